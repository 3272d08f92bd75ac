#!/usr/bin/env python
"""Sequence classification with ResLoRA (arXiv 2402.18039) on RoBERTa, with Accelerate.

ResLoRA adapts ``query``/``value``; the classification head is trained fully and exported with the
adapter (``modules_to_save=["classifier"]``; the paper's code froze it by mistake). After training the
ResLoRA adapter is merged into a plain LoRA (``--merge``), the merged model is evaluated, the plain
LoRA is saved in peft format, and the script checks that stock ``PeftModel.from_pretrained`` loads it
and reproduces the merged metric.

Hub mode (GLUE through ``datasets``; needs the hub):

    accelerate launch examples/train_roberta_glue_reslora.py --model_name_or_path roberta-large \\
        --task_name sst2 --structure is --rank 4 --lora_alpha 16 --learning_rate 4e-4 \\
        --num_train_epochs 10 --max_length 128 --output_dir out/roberta-sst2-is

Offline mode (default when no model is given, or ``--offline``): a tiny RoBERTa built from a
``RobertaConfig`` is first pretrained fully, deterministically, on a synthetic counting task
("does marker A occur more often than marker B?"), cached in ``<output_dir>/base_model`` (or
``--offline_base_dir``). ResLoRA then fine-tunes it on a related task with other markers ("more C
than D?", with A and B left in as distractors), where the base is at chance:

    python examples/train_roberta_glue_reslora.py --structure bs --output_dir /tmp/roberta-bs

The last stdout line is a JSON summary: accuracy before fine-tuning, before merging (the unmerged
ResLoRA model), after merging, after the stock-peft load, the merge error and logit differences.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    EvalHistory,
    add_reslora_args,
    add_training_args,
    check_training_setup,
    collect_logits,
    max_abs_diff,
    merge_with_report,
    print_summary,
    process_group_kwargs,
    release_ddp_reducer,
    reslora_config_from_args,
    start_shortcut_schedule,
    to_device,
    training_steps,
)

from reslora_diffusers import inject_reslora, merged_view, save_merged_lora, save_training_state  # noqa: E402

logger = logging.getLogger(__name__)

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

# ------------------------------------------------------------------------- offline tiny task
# Token ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, 4 <mask>, then markers, then filler tokens.
BOS, PAD, EOS = 0, 1, 2
MARK_A, MARK_B, MARK_C, MARK_D = 5, 6, 7, 8
FIRST_FILLER = 13
OFFLINE_VOCAB = 48


def offline_examples(n: int, first: int, second: int, distractors: tuple, seed: int, min_len=12, max_len=20):
    """``n`` token sequences; label 1 iff token ``first`` occurs more often than token ``second``.

    ``first`` and ``second`` occur 1..5 times each (never equally often), each distractor 1..5 times
    independently of the label, at random places among uniform filler tokens.
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        seq = [rng.randint(FIRST_FILLER, OFFLINE_VOCAB - 1) for _ in range(length)]
        n_first, n_second = rng.sample(range(1, 6), 2)
        marks = [first] * n_first + [second] * n_second
        for token in distractors:
            marks += [token] * rng.randint(1, 5)
        marks = marks[:length]
        for mark, place in zip(marks, rng.sample(range(length), len(marks))):
            seq[place] = mark
        examples.append({"input_ids": [BOS] + seq + [EOS], "labels": int(n_first > n_second)})
    return examples


def offline_pretrain_task(seed: int):
    """Base pretraining: are there more A than B? (train, eval)."""
    return offline_examples(4000, MARK_A, MARK_B, (), seed + 1), offline_examples(500, MARK_A, MARK_B, (), seed + 2)


def offline_finetune_task(seed: int, num_train: int, num_eval: int):
    """Fine-tuning: are there more C than D? A and B stay in as distractors (counts independent of the label)."""
    return (
        offline_examples(num_train, MARK_C, MARK_D, (MARK_A, MARK_B), seed + 3),
        offline_examples(num_eval, MARK_C, MARK_D, (MARK_A, MARK_B), seed + 4),
    )


def offline_config(args):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=OFFLINE_VOCAB, hidden_size=args.offline_hidden_size, num_hidden_layers=args.offline_num_layers,
        num_attention_heads=4, intermediate_size=2 * args.offline_hidden_size, max_position_embeddings=40,
        type_vocab_size=1, num_labels=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def pad_collate(examples: list[dict]) -> dict:
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def build_offline_base(args, base_dir: str):
    """Pretrain the tiny RoBERTa fully on the more-A-than-B task and save it (deterministic, single process)."""
    from transformers import RobertaForSequenceClassification

    config_path = os.path.join(base_dir, "config.json")
    stamp_path = os.path.join(base_dir, "offline_pretraining.json")
    recipe = {
        "hidden_size": args.offline_hidden_size, "num_layers": args.offline_num_layers,
        "steps": args.offline_pretrain_steps, "seed": args.seed, "task": "more-A-than-B", "version": 2,
    }
    if os.path.exists(config_path) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == recipe:
                return
    torch.manual_seed(args.seed)
    model = RobertaForSequenceClassification(offline_config(args))
    train, evaluation = offline_pretrain_task(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, collate_fn=pad_collate, generator=gen)
    model.train()
    step = 0
    while step < args.offline_pretrain_steps:
        for batch in loader:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= args.offline_pretrain_steps:
                break
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(evaluation, batch_size=256, collate_fn=pad_collate):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    recipe["pretrain_eval_accuracy"] = correct / len(evaluation)
    model.save_pretrained(base_dir)
    with open(stamp_path, "w") as f:
        json.dump({k: v for k, v in recipe.items() if k != "pretrain_eval_accuracy"}, f)
    with open(os.path.join(base_dir, "pretraining_report.json"), "w") as f:
        json.dump(recipe, f)
    logger.info("pretrained the offline base: %s", recipe)


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


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model_name_or_path", default=None,
                        help="Hub id or local path of a RoBERTa-family model (e.g. roberta-large). Omit for offline mode.")
    parser.add_argument("--task_name", default="sst2", choices=sorted(GLUE_KEYS), help="GLUE task (hub mode).")
    parser.add_argument("--offline", action="store_true", help="Use the tiny embedded model and task.")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--target_modules", nargs="+", default=["query", "value"])
    parser.add_argument("--freeze_classifier", action="store_true",
                        help="Freeze the classification head as the paper's code did (not recommended).")
    offline = parser.add_argument_group("offline mode")
    offline.add_argument("--offline_base_dir", default=None,
                         help="Cache of the pretrained tiny base (default: <output_dir>/base_model).")
    offline.add_argument("--offline_pretrain_steps", type=int, default=300)
    offline.add_argument("--offline_hidden_size", type=int, default=64)
    offline.add_argument("--offline_num_layers", type=int, default=3)
    offline.add_argument("--offline_num_train", type=int, default=2000)
    offline.add_argument("--offline_num_eval", type=int, default=500)
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (CPU runs).")
    add_reslora_args(parser)
    add_training_args(parser)
    parser.set_defaults(learning_rate=3e-3, num_train_epochs=3, lora_alpha=8, rank=4, per_device_train_batch_size=32)
    args = parser.parse_args(argv)
    args.offline = args.offline or args.model_name_or_path is None
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", f"roberta-{'offline' if args.offline else args.task_name}-{args.structure}")
    return args


def evaluate(model, loader, accelerator, task: str, is_regression: bool) -> dict:
    model.eval()
    preds, refs = [], []
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            pred = logits.squeeze(-1) if is_regression else logits.argmax(dim=-1)
            pred, labels = accelerator.gather_for_metrics((pred, labels))
            preds.append(pred.float().cpu() if is_regression else pred.cpu())
            refs.append(labels.cpu())
    model.train()
    return compute_metrics(task, torch.cat(preds).numpy(), torch.cat(refs).numpy())


def main(argv=None, return_state: bool = False):
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import PeftModel
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, get_scheduler

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              kwargs_handlers=process_group_kwargs())  # gloo for DeepSpeed without CUDA
    # refuse FSDP / ZeRO-3, and DeepSpeed settings that disagree with the flags, before any work
    mode = check_training_setup(accelerator, args.gradient_accumulation_steps, args.max_grad_norm)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("distributed mode: %s, %d process(es)", mode, accelerator.num_processes)
    if args.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.time()

    # ---- base model and data
    if args.offline:
        base_path = args.offline_base_dir or os.path.join(args.output_dir, "base_model")
        if accelerator.is_main_process:
            build_offline_base(args, base_path)
        accelerator.wait_for_everyone()
        train_set, eval_set = offline_finetune_task(args.seed, args.offline_num_train, args.offline_num_eval)
        num_labels, is_regression, task = 2, False, "offline-more-C-than-D"
        collate = pad_collate
        model_kwargs = {}
    else:
        from transformers import AutoTokenizer, DataCollatorWithPadding

        base_path = args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        with accelerator.main_process_first():
            train_set, eval_set, num_labels, is_regression = glue_data(args, tokenizer)
        task = args.task_name
        collate = DataCollatorWithPadding(tokenizer)
        model_kwargs = {"num_labels": num_labels}
        if is_regression:
            model_kwargs["problem_type"] = "regression"

    def load_base():
        set_seed(args.seed)  # the same classifier init every time a new head is created
        return AutoModelForSequenceClassification.from_pretrained(base_path, **model_kwargs)

    set_seed(args.seed)
    model = load_base()
    modules_to_save = None if args.freeze_classifier else ["classifier"]
    cfg = reslora_config_from_args(args, args.target_modules, modules_to_save)
    inject_reslora(model, cfg)

    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, batch_size=args.per_device_train_batch_size,
                                               collate_fn=collate, generator=gen)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
    # calibration batches for the merge ('ls' fit, error of every merge): a few fixed training batches
    calib_loader = torch.utils.data.DataLoader(train_set, batch_size=args.per_device_train_batch_size, collate_fn=collate)
    calibration_batches = []
    for batch in calib_loader:
        if len(calibration_batches) >= args.num_calibration_batches:
            break
        calibration_batches.append({k: v for k, v in batch.items() if k != "labels"})

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    max_steps, num_epochs = training_steps(math.ceil(len(train_loader) / accelerator.num_processes), args)
    # the prepared scheduler steps num_processes times per optimizer step: scale warmup and total alike
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    n_trainable = sum(p.numel() for p in trainable)
    logger.info("ResLoRA %s (pre_num=%d, r=%d) on %s: %d trainable parameters, %d steps",
                args.structure, args.pre_num, args.rank, args.target_modules, n_trainable, max_steps)

    evals = EvalHistory(lambda: evaluate(model, eval_loader, accelerator, task, is_regression),
                        lambda m: m["accuracy"], args.eval_steps)
    metrics_base = evals.at(0)  # B = 0: the base + its head
    logger.info("before fine-tuning: %s", metrics_base)

    # ---- training
    progress = tqdm(range(max_steps), disable=not accelerator.is_local_main_process or args.no_progress_bar,
                    desc=f"ResLoRA-{args.structure}")
    history, step, epoch_metrics = [], 0, metrics_base
    t_loop, eval_seconds_before = time.perf_counter(), evals.seconds
    unwrapped = accelerator.unwrap_model(model)
    calib = [to_device(b, accelerator.device) for b in calibration_batches]
    forward_fn = lambda m, b: m(**b).logits  # noqa: E731
    shortcuts = start_shortcut_schedule(unwrapped, args, max_steps, optimizer, calib, forward_fn)
    model.train()
    for epoch in range(num_epochs):
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                shortcuts.update(step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                evals.maybe(step)
            if step >= max_steps:
                break
        epoch_metrics = evals.at(step)
        history.append({"epoch": epoch, "step": step, **epoch_metrics})
        accelerator.print(f"epoch {epoch} step {step}: {json.dumps(epoch_metrics)}")
        if step >= max_steps:
            break
    progress.close()
    train_seconds = time.perf_counter() - t_loop - (evals.seconds - eval_seconds_before)

    # ---- merge into plain LoRA and evaluate the merged model
    result, merge_err = merge_with_report(unwrapped, args, calib, forward_fn)
    with merged_view(unwrapped, result):
        metrics_merged = evaluate(model, eval_loader, accelerator, task, is_regression)
    accelerator.print(f"merged ({merge_err['method']}): {json.dumps(metrics_merged)}; merge error {json.dumps(merge_err)}")

    adapter_dir = os.path.join(args.output_dir, "merged_adapter")
    if accelerator.is_main_process:
        save_merged_lora(result, adapter_dir, format="peft", model=unwrapped, task_type="SEQ_CLS",
                         base_model_name_or_path=os.path.abspath(base_path) if args.offline else base_path)
        save_training_state(unwrapped, os.path.join(args.output_dir, "reslora_training_state"),
                            extra={"task": task, "merge": args.merge})
    accelerator.wait_for_everyone()

    # ---- stock peft: a fresh base + PeftModel.from_pretrained must reproduce the merged model
    stock = PeftModel.from_pretrained(load_base(), adapter_dir).to(accelerator.device).eval()
    metrics_stock = evaluate(stock, eval_loader, accelerator, task, is_regression)
    compare = calib[:2]
    logits_stock = collect_logits(stock, compare, forward_fn)
    logits_unmerged = collect_logits(unwrapped, compare, forward_fn)
    with merged_view(unwrapped, result):
        logits_merged = collect_logits(unwrapped, compare, forward_fn)
    accelerator.print(f"stock PeftModel.from_pretrained: {json.dumps(metrics_stock)} (merged: {json.dumps(metrics_merged)})")

    metric = "accuracy"
    summary = {
        "example": "roberta",
        "mode": "offline" if args.offline else "hub",
        "task": task,
        "structure": args.structure,
        "pre_num": args.pre_num,
        "rank": args.rank,
        "merge": args.merge,
        "steps": step,
        "distributed": mode,
        "accuracy_before_finetuning": metrics_base[metric],
        "accuracy_before_merge": epoch_metrics[metric],
        "accuracy_after_merge": metrics_merged[metric],
        "accuracy_stock_peft": metrics_stock[metric],
        "metrics_before_merge": epoch_metrics,
        "metrics_after_merge": metrics_merged,
        "metrics_stock_peft": metrics_stock,
        "merge_error": merge_err,
        "max_abs_logit_diff_stock_vs_merged": max_abs_diff(logits_stock, logits_merged),
        "max_abs_logit_diff_stock_vs_unmerged": max_abs_diff(logits_stock, logits_unmerged),
        "history": history,
        "eval_history": evals.history,
        "train_seconds": round(train_seconds, 3),
        "adapter_dir": adapter_dir,
        "base_model": base_path,
        "seconds": round(time.time() - t_start, 2),
    }
    if accelerator.is_main_process:
        print_summary(summary, args.output_dir)
    accelerator.wait_for_everyone()
    release_ddp_reducer(model)  # the process group, not the DDP Reducer, must be the last to go (hang at exit)
    if return_state:
        return {"summary": summary, "model": unwrapped, "stock": stock, "merge_result": result,
                "compare_batches": compare, "forward_fn": forward_fn, "accelerator": accelerator,
                "load_base": load_base}
    return summary


if __name__ == "__main__":
    main()
