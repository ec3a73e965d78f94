"""The names an evaluation reports: its sets and its metrics, with what each metric measures. The report lays its
tables out by them, and the settings check a ``SET/METRIC`` name of the evaluation during training against them."""

SET_ORDER = ("forget_train", "forget_held_out", "normal_held_out")

METRIC_DESCRIPTIONS = {
    "nll": "teacher-forced NLL per response token of the dataset response (nats)",
    "ppl": "exp(nll): perplexity of the dataset responses",
    "kl": "mean per-token KL(original ‖ model) over response tokens (nats)",
    "behaviour_rate": "fraction of generations showing the behaviour being unlearned (the application's test)",
    "reproduction_rate": "fraction of greedy generations whose ROUGE-L of the dataset response is ≥ the threshold",
    "rouge_l_recall": "mean ROUGE-L recall (rouge-score rougeL: LCS / response words) of the dataset response",
    "rouge_l_precision": "mean ROUGE-L precision (rouge-score rougeL: LCS / generation words) of the dataset response",
    "rouge_l_f1": "mean ROUGE-L F1 (rouge-score rougeL) between the generation and the dataset response",
    "bleu": "mean sentence BLEU (sacrebleu, 0-100) of the generation against the reference text",
    "harmful_rate": "fraction of generations the harm classifier labels harmful",
    "hallucination_rate": "fraction of generations closer (ROUGE-L F1) to the hallucinated answer than to the right "
                          "one, or flagged by the judge classifier",
    "similarity_to_original": "mean ROUGE-L F1 between the model's and the original model's generations",
    "distinct_1": "distinct unigrams / all unigrams over the generations",
    "distinct_2": "distinct bigrams / all bigrams over the generations",
    "fluency_ppl": "perplexity of the generated tokens under the original model",
    "generation_tokens": "mean number of generated tokens",
    "answer_prob": "TOFU: mean of exp(−mean NLL per token) of the dataset answer",
    "forget_truth_ratio": "TOFU: mean of min(R, 1/R), R = P(perturbed answers, geometric mean) / P(paraphrased "
                          "answer) per token; 1 = the right answer no likelier than wrong ones",
    "retain_truth_ratio": "TOFU: mean of max(0, 1 − R), R as for forget_truth_ratio; 1 = the right answer far likelier",
}
"""Every metric an evaluation may report, in table order, with what it measures (one line each)."""
