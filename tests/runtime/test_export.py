"""The streaming Hugging Face export of a ZeRO-3 engine: the trained weights, Hugging Face's layout (shards, index,
tied weights, merged LoRA), rank 0's memory, and a folder that is complete or absent after a kill.

Each test starts tests/runtime/workers/export_run.py on CPU ranks (gloo); rank 0 also saves the weights as DeepSpeed's
consolidated state dict has them (the reference), so the export is compared with the engine, not with itself. The
killed and redone export runs on 2 ranks (the gather of every rank's partition, rank 0's memory) and so does the untied
layout case; the other layouts and the composite config, whose properties do not depend on the rank count, on one rank
(each rank costs its start-up: imports and deepspeed.initialize).
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from launching import free_port
from safetensors.torch import load_file
from warm_start import popen_python

from dsunlearn.data.tiny import build_tiny_causal_lm, save_tiny_model
from dsunlearn.settings.config import ConfigError, OutputConfig, RunConfig, parse_size

WORKER = Path(__file__).parent / "workers" / "export_run.py"


def start_workers(model_dir, run_dir, *args, env=None, ranks=2):
    port = free_port()
    base_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WORLD_SIZE=str(ranks),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
    return [
        popen_python([str(WORKER), str(model_dir), str(run_dir), *args],
                     dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank)))
        for rank in range(ranks)
    ]


def run_workers(model_dir, run_dir, *args, env=None, ranks=2):
    procs = start_workers(model_dir, run_dir, *args, env=env, ranks=ranks)
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs[0].splitlines()[-40:])


def exported_tensors(folder: Path) -> dict:
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def assert_loads_as(folder: Path, reference: dict):
    """``from_pretrained`` loads ``folder`` and every weight (tied ones under each name) equals the reference."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert set(loaded) == set(reference)
    different = [name for name in reference if not torch.equal(loaded[name], reference[name])]
    assert not different, different


@pytest.fixture(scope="module")
def eos_list_model_dir(tmp_path_factory, bpe_tokenizer):
    """The tiny Llama with a generation config that ends on either of two tokens, as Llama 3 Instruct's does."""
    model = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.generation_config.eos_token_id = [bpe_tokenizer.eos_token_id, 7]
    return save_tiny_model(model, bpe_tokenizer, tmp_path_factory.mktemp("eos_list_model"))


@pytest.fixture(scope="module")
def gemma3_model_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny Gemma 3 (the multimodal model AutoModelForCausalLM loads): its config is composite, ``use_cache`` lives
    in ``text_config`` only; with attention dropout, which training turns off."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    config = Gemma3Config(
        text_config=dict(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"], attention_dropout=0.1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=len(bpe_tokenizer) - 3, boi_token_index=len(bpe_tokenizer) - 2,
        eoi_token_index=len(bpe_tokenizer) - 1,
    )
    torch.manual_seed(0)
    return save_tiny_model(AutoModelForCausalLM.from_config(config), bpe_tokenizer, tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, bpe_tokenizer):
    model = build_tiny_causal_lm(bpe_tokenizer, hidden_size=32, num_layers=2, num_heads=4, tie_word_embeddings=True)
    return save_tiny_model(model, bpe_tokenizer, tmp_path_factory.mktemp("tied_model"))


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory, bpe_tokenizer):
    """An 86 MB fp32 Llama: big enough that a whole-model copy stands out from the process's memory noise."""
    model = build_tiny_causal_lm(bpe_tokenizer, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1024)
    return save_tiny_model(model, bpe_tokenizer, tmp_path_factory.mktemp("big_model"))


def test_max_shard_size_is_checked_with_the_other_settings():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ConfigError, match="output.max_shard_size"):
        RunConfig(output=OutputConfig(max_shard_size="5 gigs"))


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["untied_head", "tied_embeddings", "lora"])
def test_streaming_export_holds_the_trained_weights_in_hugging_face_layout(case, eos_list_model_dir, tied_model_dir,
                                                                         tmp_path):
    model_dir = tied_model_dir if case == "tied_embeddings" else eos_list_model_dir
    run_dir = tmp_path / "run"
    # Untied: one file, then a second export over it in shards of 30 KB (the 64 KB embedding and head get one each),
    # which must replace the first, not mix with it.
    exports = {"untied_head": ["single:5GB", "final:5GB", "final:30KB"], "tied_embeddings": ["final:30KB"],
               "lora": ["final:5GB"]}[case]
    lora = ["--lora_rank", "4"] if case == "lora" else []
    # The untied case on 2 ranks: each rank trains on its own batch and holds half of each weight.
    run_workers(model_dir, run_dir, "--train_step", "--reference", *lora,
                *[arg for spec in exports for arg in ("--export", spec)], ranks=2 if case == "untied_head" else 1)

    reference = torch.load(run_dir / "reference.pt")
    original = load_file(Path(model_dir) / "model.safetensors")
    final = run_dir / "final"
    assert_loads_as(final, reference)
    # Hugging Face's names: a tied head is written once, as the embedding; LoRA is merged under the base names.
    assert set(exported_tensors(final)) == set(original)
    trained = [name for name in original if not torch.equal(reference[name], original[name])]
    if case == "lora":  # the adapters moved the adapted layers only (the head and norms have no adapter)
        assert any("q_proj" in name for name in trained) and not any("norm" in name or "lm_head" in name
                                                                     for name in trained)
    else:
        assert len(trained) == len(original)

    files = sorted(path.name for path in final.glob("*.safetensors"))
    if exports[-1].endswith("5GB"):
        assert files == ["model.safetensors"] and not (final / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 2 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        index = json.loads((final / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(original)
        for filename in files:
            tensors = load_file(final / filename)
            assert {n for n, f in index["weight_map"].items() if f == filename} == set(tensors)
            sizes = [t.numel() * t.element_size() for t in tensors.values()]
            assert len(sizes) == 1 or sum(sizes) <= 30_000  # several tensors only within max_shard_size
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    if case == "untied_head":
        assert_loads_as(run_dir / "single", reference)
        assert sorted(p.name for p in run_dir.iterdir()) == ["final", "memory.json", "reference.pt", "single"]

    from transformers import AutoConfig, GenerationConfig

    # Training turns the cache off in the model's config; the export restores the original's.
    assert AutoConfig.from_pretrained(model_dir).use_cache is True
    assert AutoConfig.from_pretrained(final).use_cache is True
    assert GenerationConfig.from_pretrained(final).to_dict() == GenerationConfig.from_pretrained(model_dir).to_dict()
    assert (final / "generation_config.json").read_text() == (Path(model_dir) / "generation_config.json").read_text()
    assert (final / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def killed_then_redone_export(big_model_dir, tmp_path_factory):
    """A complete export of the big model, then a second one in 1 MB shards killed (every rank, SIGKILL) once it has
    written a shard, then a new run's export in 8 MB shards with rank 0's memory measured.

    Returns the run folder and what the kill left: the export folders' names and final/'s weight files.
    """
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    procs = start_workers(big_model_dir, run_dir, "--export", "final:5GB", "--export", "final:1MB")
    final = run_dir / "final"
    deadline = time.monotonic() + 400
    while not (final.is_dir() and list(run_dir.glob("final.tmp-*/*.safetensors"))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].communicate()[0][-4000:]
        time.sleep(0.002)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=60)
    after_kill = {"folders": sorted(p.name for p in run_dir.iterdir()),
                  "final_weights": sorted(p.name for p in final.glob("*.safetensors"))}
    # A fixed mmap threshold makes glibc return freed tensors to the system at once, so VmRSS follows live memory.
    run_workers(big_model_dir, run_dir, "--export", "final:8MB", "--measure_memory",
                env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    return run_dir, after_kill


@pytest.mark.distributed
def test_a_killed_export_leaves_the_earlier_final_and_the_next_export_a_complete_one(killed_then_redone_export):
    run_dir, after_kill = killed_then_redone_export
    assert after_kill["folders"][0] == "final" and after_kill["folders"][1].startswith("final.tmp-")
    assert len(after_kill["folders"]) == 2
    assert after_kill["final_weights"] == ["model.safetensors"]  # the first export, whole

    assert sorted(p.name for p in run_dir.iterdir()) == ["final", "memory.json", "reference.pt"]
    final = run_dir / "final"
    assert len(list(final.glob("model-*-of-*.safetensors"))) > 1 and not (final / "model.safetensors").exists()
    assert_loads_as(final, torch.load(run_dir / "reference.pt"))


@pytest.mark.distributed
def test_export_peak_memory_on_rank_0_is_well_below_the_model_size(killed_then_redone_export):
    run_dir, _ = killed_then_redone_export
    memory = json.loads((run_dir / "memory.json").read_text())
    model_mb, export_mb = memory["model_bytes"] / 1e6, memory["export_peak_extra"][0] / 1e6
    consolidated_mb = memory["consolidated_peak_extra"] / 1e6
    print(f"model {model_mb:.1f} MB; rank 0's peak extra memory: streaming export (8MB shards) {export_mb:.1f} MB, "
          f"DeepSpeed's consolidated state dict {consolidated_mb:.1f} MB")
    assert consolidated_mb > 0.9 * model_mb  # the measurement does see a whole-model copy
    assert export_mb < 0.5 * model_mb


@pytest.mark.distributed
def test_the_export_of_a_composite_config_is_the_originals(gemma3_model_dir, tmp_path):
    """Training turns the cache off; the exported config.json must still be the original's, key for key (Gemma 3's
    has no top-level ``use_cache``), and so must the generation config."""
    run_dir = tmp_path / "run"
    run_workers(gemma3_model_dir, run_dir, "--export", "final:5GB", ranks=1)
    final = run_dir / "final"
    original, exported = (json.loads((folder / "config.json").read_text()) for folder in (gemma3_model_dir, final))
    assert exported == original
    assert (final / "generation_config.json").read_text() == (gemma3_model_dir / "generation_config.json").read_text()


def test_the_merge_adds_the_adapters_of_an_embedding_layer_too():
    """peft's lora.Embedding keeps its adapters in lora_embedding_A/B, not lora_A/B: the merge adds them as peft's
    own merge does (an export without them would ship the base embedding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsunlearn.runtime.export import _merged_lora_weight

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, tie_word_embeddings=False))
    adapted = get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]))
    layer = adapted.base_model.model.model.embed_tokens
    with torch.no_grad():
        for param in layer.lora_embedding_A.parameters():  # peft starts A at 0: the delta would be 0
            param.normal_()
    base = layer.get_base_layer().weight.detach().clone()
    merged = _merged_lora_weight(layer, base.clone())
    assert not torch.equal(merged, base)
    input_ids = torch.arange(40).view(4, 10)
    torch.testing.assert_close(torch.nn.functional.embedding(input_ids, merged), layer(input_ids))
