"""Local stand-ins for what a hub serves (tests never reach one): a model repository in the Hugging Face hub cache's
layout, loaded by hub id and revision with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the cache folder, and a tiny
harm classifier."""

import hashlib
import os
import shutil
from pathlib import Path


def add_revision(hub_cache: Path, repo_id: str, model_dir: Path, branch: str | None = None,
                 mtime: float | None = None) -> str:
    """Put the files of ``model_dir`` into ``hub_cache`` as one commit of ``repo_id`` (the blobs named by their
    sha256, the snapshot's files linking to them, as huggingface_hub stores them); ``branch`` (e.g. "main") then points
    at it. ``mtime`` stamps the copied files (a node that staged its copy at another time). Returns the commit hash."""
    repo = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in files:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
            if mtime is not None:
                os.utime(blob, (mtime, mtime))
        link = snapshot / path.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return commit


def save_harm_classifier(path: Path, tokenizer) -> Path:
    """A tiny random sequence classifier whose labels are named like a real harm classifier's ("safe", "Harmful"),
    biased so that both labels occur on the demo prompts."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "safe", 1: "Harmful"}, label2id={"safe": 0, "Harmful": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        classifier = LlamaForSequenceClassification(config)
    with torch.no_grad():
        classifier.score.weight.mul_(40.0)
    classifier.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
