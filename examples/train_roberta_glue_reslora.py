#!/usr/bin/env python
"""Sequence classification with ResLoRA (arXiv 2402.18039) on RoBERTa, with Accelerate.

ResLoRA adapts ``query``/``value``; the classification head is trained fully and exported with the
adapter (``modules_to_save=["classifier"]``; the paper's code froze it by mistake). After training the
ResLoRA adapter is merged into a plain LoRA (``--merge``), the merged model is evaluated, the plain
LoRA is saved in peft format, and the script checks that stock ``PeftModel.from_pretrained`` loads it
and reproduces the merged metric.

Hub mode (GLUE through ``datasets``; needs the hub):

    accelerate launch examples/train_roberta_glue_reslora.py --model_name_or_path roberta-large \\
        --task_name sst2 --reslora_structure is --rank 4 --lora_alpha 16 --learning_rate 4e-4 \\
        --num_train_epochs 10 --max_length 128 --output_dir out/roberta-sst2-is

Offline mode (default when no model is given, or ``--offline``): a tiny RoBERTa built from a
``RobertaConfig`` is first pretrained fully, deterministically, on a synthetic counting task
("does marker A occur more often than marker B?"), cached in ``<output_dir>/base_model`` (or
``--offline_base_dir``). ResLoRA then fine-tunes it on a related task with other markers ("more C
than D?", with A and B left in as distractors), where the base is at chance:

    python examples/train_roberta_glue_reslora.py --reslora_structure bs --output_dir /tmp/roberta-bs

The last stdout line is a JSON summary: accuracy before fine-tuning, before merging (the unmerged
ResLoRA model), after merging, after the stock-peft load, the merge error and logit differences.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from reslora_diffusers.demo.tiny_roberta_task import classification_task, offline_task, parser
from reslora_diffusers.integrations.transformers_finetune import finish_args, run

GLUE_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


# ------------------------------------------------------------------------------- hub (GLUE)
def glue_data(args, tokenizer):
    from datasets import load_dataset

    raw = load_dataset("nyu-mll/glue", args.task_name)
    first, second = GLUE_KEYS[args.task_name]
    is_regression = args.task_name == "stsb"
    num_labels = 1 if is_regression else raw["train"].features["label"].num_classes

    def preprocess(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        out = tokenizer(*texts, truncation=True, max_length=args.max_length)
        out["labels"] = batch["label"]
        return out

    processed = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    eval_split = "validation_matched" if args.task_name == "mnli" else "validation"
    train, evaluation = processed["train"], processed[eval_split]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation, num_labels, is_regression


def compute_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict:
    """GLUE's metrics (accuracy everywhere it is defined, plus F1 / Matthews / Pearson-Spearman)."""
    if task == "stsb":
        pearson = float(np.corrcoef(preds, labels)[0, 1]) if len(preds) > 1 else 0.0
        ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        spearman = float(np.corrcoef(ranks(preds), ranks(labels))[0, 1]) if len(preds) > 1 else 0.0
        return {"pearson": pearson, "spearmanr": spearman, "accuracy": pearson}
    metrics = {"accuracy": float((preds == labels).mean()) if len(labels) else 0.0}
    if task in ("mrpc", "qqp"):
        tp = float(((preds == 1) & (labels == 1)).sum())
        fp = float(((preds == 1) & (labels == 0)).sum())
        fn = float(((preds == 0) & (labels == 1)).sum())
        metrics["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
    if task == "cola":
        tp = float(((preds == 1) & (labels == 1)).sum())
        tn = float(((preds == 0) & (labels == 0)).sum())
        fp = float(((preds == 1) & (labels == 0)).sum())
        fn = float(((preds == 0) & (labels == 1)).sum())
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        metrics["matthews_correlation"] = (tp * tn - fp * fn) / den if den > 0 else 0.0
    return metrics


def hub_task(args, accelerator):
    """The hub model fine-tuned on the GLUE task, with GLUE's metrics."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    with accelerator.main_process_first():
        train_set, eval_set, num_labels, is_regression = glue_data(args, tokenizer)
    model_kwargs = {"num_labels": num_labels, **({"problem_type": "regression"} if is_regression else {})}
    return classification_task(args, accelerator, label=args.task_name, base_path=args.model_name_or_path,
                               train_set=train_set, eval_set=eval_set, collate=DataCollatorWithPadding(tokenizer),
                               compute_metrics=lambda preds, labels: compute_metrics(args.task_name, preds, labels),
                               model_kwargs=model_kwargs)


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument_group("hub mode").add_argument("--task_name", default="sst2", choices=sorted(GLUE_KEYS),
                                                  help="GLUE task (hub mode).")
    args = p.parse_args(argv)
    return finish_args(args, "roberta", hub_label=args.task_name)


def main(argv=None, return_state: bool = False):
    args = parse_args(argv)
    return run(args, offline_task if args.offline else hub_task, return_state=return_state)


if __name__ == "__main__":
    main()
