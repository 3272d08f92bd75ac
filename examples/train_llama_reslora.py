#!/usr/bin/env python
"""Causal-LM fine-tuning with ResLoRA (arXiv 2402.18039) on a LLaMA-family model, with Accelerate.

Question/answer text in the SVAMP/GSM8K style: the model reads a word problem and writes its
solution ending in "The answer is N". ResLoRA adapts ``q_proj``/``v_proj`` (the paper's NLG setting:
r=4, alpha=8). After training the adapter is merged into a plain LoRA (``--merge``), exact-match
accuracy of greedy generation is measured before and after merging, the plain LoRA is saved in peft
format, and the script checks that stock ``PeftModel.from_pretrained`` loads it and reproduces the
merged accuracy.

Hub mode (needs the hub): any LLaMA-family model and a dataset with question/answer columns
(``openai/gsm8k`` ``main``: question/answer with "#### N"; ``ChilleD/SVAMP``: Body/Question/Answer;
or any dataset with ``question`` and ``answer`` columns):

    accelerate launch examples/train_llama_reslora.py --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --dataset_name ChilleD/SVAMP --structure is --rank 4 --lora_alpha 8 --learning_rate 3e-4 \\
        --num_train_epochs 3 --per_device_train_batch_size 4 --max_new_tokens 256 --output_dir out/llama-svamp-is

Offline mode (default when no model is given, or ``--offline``): a word-level tokenizer and a tiny
``LlamaForCausalLM`` are built in code. The base is first pretrained fully (deterministic, cached in
``<output_dir>/base_model`` or ``--offline_base_dir``) on one family of procedurally generated
problems ("Tom has 3 apples and buys 4 more . How many apples does Tom have ?" -> "The answer is
7", and "gives away"); ResLoRA then fine-tunes it on another phrasing with new verbs ("Tom had 3
apples . Then he found 4 more . How many apples does Tom have now ?", and "lost"):

    python examples/train_llama_reslora.py --structure ms --output_dir /tmp/llama-ms

The last stdout line is a JSON summary: exact-match accuracy before fine-tuning, before merging (the
unmerged ResLoRA model), after merging, after the stock-peft load, the merge error and logit
differences.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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

ANSWER_RE = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)

# ------------------------------------------------------------------------- offline tiny task
NAMES = [("Tom", "he"), ("Ben", "he"), ("Sam", "he"), ("Jack", "he"), ("Anna", "she"), ("Lucy", "she"),
         ("Mia", "she"), ("Emma", "she")]
OBJECTS = ["apples", "pens", "books", "cards", "coins", "eggs", "toys", "stamps"]
MAX_OPERAND = 9
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def _pretrain_problem(rng):
    """Base family: 'has ... and buys N more' / 'has ... and gives away N'."""
    (name, _), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return f"{name} has {a} {obj} and buys {b} more . How many {obj} does {name} have ?", a + b
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {obj} and gives away {b} . How many {obj} does {name} have ?", a - b


def _finetune_problem(rng):
    """Fine-tuning family: another phrasing with verbs the base never saw ('found' adds, 'lost' subtracts)."""
    (name, pron), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if rng.random() < 0.5:
        return f"{name} had {a} {obj} . Then {pron} found {b} more . How many {obj} does {name} have now ?", a + b
    a, b = max(a, b), min(a, b)
    return f"{name} had {a} {obj} . Then {pron} lost {b} . How many {obj} does {name} have now ?", a - b


def offline_problems(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    make = _pretrain_problem if kind == "pretrain" else _finetune_problem
    out = []
    for _ in range(n):
        question, answer = make(rng)
        out.append({"prompt": question, "completion": f"The answer is {answer}", "answer": str(answer)})
    return out


def build_offline_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the offline problems' words (BOS added, no EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set("The answer is has and buys more gives away had Then found lost How many does have now".split())
    words |= {n for n, _ in NAMES} | {p for _, p in NAMES} | set(OBJECTS) | {".", "?", ","}
    words |= {str(i) for i in range(2 * MAX_OPERAND + 1)}
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left", model_max_length=64)


def offline_config(args, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.offline_hidden_size, intermediate_size=2 * args.offline_hidden_size,
        num_hidden_layers=args.offline_num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def build_offline_base(args, base_dir: str):
    """Pretrain the tiny LLaMA fully on the base problem family; save model and tokenizer (deterministic)."""
    from transformers import LlamaForCausalLM

    recipe = {
        "hidden_size": args.offline_hidden_size, "num_layers": args.offline_num_layers,
        "steps": args.offline_pretrain_steps, "seed": args.seed, "task": "has/buys/gives-away", "version": 1,
    }
    stamp_path = os.path.join(base_dir, "offline_pretraining.json")
    if os.path.exists(os.path.join(base_dir, "config.json")) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == recipe:
                return
    tokenizer = build_offline_tokenizer()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(offline_config(args, tokenizer))
    train = tokenize_examples(offline_problems("pretrain", 4000, args.seed + 1), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / max(args.offline_pretrain_steps, 1))
    )
    gen = torch.Generator().manual_seed(args.seed)
    collate = lambda ex: train_collate(ex, tokenizer.pad_token_id)  # noqa: E731
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate, generator=gen)
    model.train()
    step = 0
    while step < args.offline_pretrain_steps:
        for batch in loader:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step >= args.offline_pretrain_steps:
                break
    model.eval()
    evaluation = offline_problems("pretrain", 200, args.seed + 2)
    correct = sum(generate_answers(model, tokenizer, evaluation, 100, 6, torch.device("cpu")))
    recipe_report = dict(recipe, pretrain_eval_exact_match=correct / len(evaluation))
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    with open(stamp_path, "w") as f:
        json.dump(recipe, f)
    with open(os.path.join(base_dir, "pretraining_report.json"), "w") as f:
        json.dump(recipe_report, f)
    logger.info("pretrained the offline base: %s", recipe_report)


# ----------------------------------------------------------------------------- hub datasets
def _number(text) -> str:
    text = str(text).strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def hub_problems(args) -> tuple[list[dict], list[dict]]:
    """GSM8K (question/answer '#### N'), SVAMP (Body/Question/Answer) or generic question/answer columns."""
    from datasets import load_dataset

    raw = load_dataset(args.dataset_name, args.dataset_config_name)
    train_split = "train"
    eval_split = next((s for s in ("test", "validation") if s in raw), None)
    if eval_split is None:
        split = raw[train_split].train_test_split(test_size=0.1, seed=args.seed)
        raw = {"train": split["train"], "test": split["test"]}
        eval_split = "test"

    def convert(row):
        if "Body" in row and "Question" in row:  # SVAMP
            question = f"{row['Body'].strip()} {row['Question'].strip()}"
            answer = _number(row["Answer"])
            return {"prompt": question, "completion": f"The answer is {answer}", "answer": answer}
        question, solution = row["question"], str(row["answer"])
        if "####" in solution:  # GSM8K: reasoning, then '#### N'
            reasoning, answer = solution.split("####")
            reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
            answer = _number(answer)
            return {"prompt": question, "completion": f"{reasoning} The answer is {answer}", "answer": answer}
        answer = _number(solution)
        return {"prompt": question, "completion": f"The answer is {answer}", "answer": answer}

    train = [convert(r) for r in raw[train_split]]
    evaluation = [convert(r) for r in raw[eval_split]]
    if args.max_train_samples:
        train = train[: args.max_train_samples]
    if args.max_eval_samples:
        evaluation = evaluation[: args.max_eval_samples]
    return train, evaluation


# ------------------------------------------------------------------------- tokenize, collate
def _prompt_text(example: dict, offline: bool) -> str:
    return example["prompt"] if offline else f"Question: {example['prompt']}\nAnswer:"


def tokenize_examples(examples: list[dict], tokenizer, max_length: int = 512, offline: bool = True) -> list[dict]:
    """Prompt tokens (loss-masked) + completion tokens + EOS."""
    out = []
    for e in examples:
        prompt = tokenizer(_prompt_text(e, offline))["input_ids"]
        completion = tokenizer(" " + e["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        labels = ([-100] * len(prompt) + completion)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_collate(examples: list[dict], pad_id: int) -> dict:
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def extract_answer(text: str):
    match = ANSWER_RE.findall(text)
    return _number(match[-1]) if match else None


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[dict], batch_size: int, max_new_tokens: int, device,
                     offline: bool = True) -> list[int]:
    """1/0 per example: does greedy generation end in the right 'The answer is N'?"""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    flags = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer([_prompt_text(e, offline) for e in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            flags += [int(extract_answer(t) == e["answer"]) for t, e in zip(texts, chunk)]
    finally:
        model.train(was_training)
    return flags


def evaluate(model, tokenizer, eval_examples, accelerator, args) -> float:
    """Exact match over the eval set: each process generates for its shard, the counts are summed over processes."""
    with accelerator.split_between_processes(list(range(len(eval_examples)))) as idx:
        shard = [eval_examples[i] for i in idx]
        flags = generate_answers(accelerator.unwrap_model(model), tokenizer, shard, args.per_device_eval_batch_size,
                                 args.max_new_tokens, accelerator.device, args.offline)
    flags = torch.tensor(flags, dtype=torch.long, device=accelerator.device)
    counts = accelerator.reduce(torch.stack([flags.sum(), torch.tensor(len(flags), device=accelerator.device)]), "sum")
    return float(counts[0]) / max(float(counts[1]), 1.0)


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model_name_or_path", default=None,
                        help="Hub id or local path of a LLaMA-family causal LM. Omit for offline mode.")
    parser.add_argument("--dataset_name", default="ChilleD/SVAMP", help="Dataset id (hub mode).")
    parser.add_argument("--dataset_config_name", default=None, help="e.g. 'main' for openai/gsm8k.")
    parser.add_argument("--offline", action="store_true", help="Use the tiny embedded model and problems.")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_new_tokens", type=int, default=None, help="Generation budget (offline 6, hub 256).")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--target_modules", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Non-reentrant gradient checkpointing (reentrant is wrong for is/ms).")
    offline = parser.add_argument_group("offline mode")
    offline.add_argument("--offline_base_dir", default=None,
                         help="Cache of the pretrained tiny base (default: <output_dir>/base_model).")
    offline.add_argument("--offline_pretrain_steps", type=int, default=600)
    offline.add_argument("--offline_hidden_size", type=int, default=64)
    offline.add_argument("--offline_num_layers", type=int, default=4)
    offline.add_argument("--offline_num_train", type=int, default=2000)
    offline.add_argument("--offline_num_eval", type=int, default=300)
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (CPU runs).")
    add_reslora_args(parser)
    add_training_args(parser)
    parser.set_defaults(learning_rate=3e-3, num_train_epochs=4, rank=4, lora_alpha=8, per_device_train_batch_size=32,
                        per_device_eval_batch_size=100)
    args = parser.parse_args(argv)
    args.offline = args.offline or args.model_name_or_path is None
    if args.max_new_tokens is None:
        args.max_new_tokens = 6 if args.offline else 256
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", f"llama-{'offline' if args.offline else 'hub'}-{args.structure}")
    return args


def main(argv=None, return_state: bool = False):
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import PeftModel
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

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

    # ---- base model, tokenizer, data
    if args.offline:
        base_path = args.offline_base_dir or os.path.join(args.output_dir, "base_model")
        if accelerator.is_main_process:
            build_offline_base(args, base_path)
        accelerator.wait_for_everyone()
        train_examples = offline_problems("finetune", args.offline_num_train, args.seed + 3)
        eval_examples = offline_problems("finetune", args.offline_num_eval, args.seed + 4)
        task = "offline-had/found/lost"
    else:
        base_path = args.model_name_or_path
        with accelerator.main_process_first():
            train_examples, eval_examples = hub_problems(args)
        task = args.dataset_name
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_path)

    set_seed(args.seed)
    model = load_base()
    model.config.use_cache = True
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inject_reslora(model, reslora_config_from_args(args, args.target_modules))

    train_set = tokenize_examples(train_examples, tokenizer, args.max_length, args.offline)
    collate = lambda ex: train_collate(ex, tokenizer.pad_token_id)  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, batch_size=args.per_device_train_batch_size,
                                               collate_fn=collate, generator=gen)
    calibration_batches = []
    for batch in torch.utils.data.DataLoader(train_set, batch_size=args.per_device_train_batch_size, collate_fn=collate):
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
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    logger.info("ResLoRA %s (pre_num=%d, r=%d) on %s: %d trainable parameters, %d steps", args.structure,
                args.pre_num, args.rank, args.target_modules, sum(p.numel() for p in trainable), max_steps)

    evals = EvalHistory(lambda: evaluate(unwrapped, tokenizer, eval_examples, accelerator, args), float, args.eval_steps)
    acc_base = evals.at(0)  # B = 0: the base model
    accelerator.print(f"before fine-tuning: exact match {acc_base:.4f}")

    # ---- training
    progress = tqdm(range(max_steps), disable=not accelerator.is_local_main_process or args.no_progress_bar,
                    desc=f"ResLoRA-{args.structure}")
    history, step, acc_unmerged = [], 0, acc_base
    t_loop, eval_seconds_before = time.perf_counter(), evals.seconds
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
        acc_unmerged = evals.at(step)
        history.append({"epoch": epoch, "step": step, "exact_match": acc_unmerged})
        accelerator.print(f"epoch {epoch} step {step}: exact match {acc_unmerged:.4f}")
        if step >= max_steps:
            break
    progress.close()
    train_seconds = time.perf_counter() - t_loop - (evals.seconds - eval_seconds_before)

    # ---- merge into plain LoRA and evaluate the merged model
    result, merge_err = merge_with_report(unwrapped, args, calib, forward_fn)
    with merged_view(unwrapped, result):
        acc_merged = evaluate(unwrapped, tokenizer, eval_examples, accelerator, args)
    accelerator.print(f"merged ({merge_err['method']}): exact match {acc_merged:.4f}; merge error {json.dumps(merge_err)}")

    adapter_dir = os.path.join(args.output_dir, "merged_adapter")
    if accelerator.is_main_process:
        save_merged_lora(result, adapter_dir, format="peft", model=unwrapped, task_type="CAUSAL_LM",
                         base_model_name_or_path=os.path.abspath(base_path) if args.offline else base_path)
        save_training_state(unwrapped, os.path.join(args.output_dir, "reslora_training_state"),
                            extra={"task": task, "merge": args.merge})
        tokenizer.save_pretrained(adapter_dir)
    accelerator.wait_for_everyone()

    # ---- stock peft: a fresh base + PeftModel.from_pretrained must reproduce the merged model
    stock = PeftModel.from_pretrained(load_base(), adapter_dir).to(accelerator.device).eval()
    acc_stock = evaluate(stock, tokenizer, eval_examples, accelerator, args)
    compare = calib[:2]
    logits_stock = collect_logits(stock, compare, forward_fn)
    logits_unmerged = collect_logits(unwrapped, compare, forward_fn)
    with merged_view(unwrapped, result):
        logits_merged = collect_logits(unwrapped, compare, forward_fn)
    accelerator.print(f"stock PeftModel.from_pretrained: exact match {acc_stock:.4f} (merged: {acc_merged:.4f})")

    summary = {
        "example": "llama",
        "mode": "offline" if args.offline else "hub",
        "task": task,
        "structure": args.structure,
        "pre_num": args.pre_num,
        "rank": args.rank,
        "merge": args.merge,
        "steps": step,
        "distributed": mode,
        "metric": "exact_match",
        "accuracy_before_finetuning": acc_base,
        "accuracy_before_merge": acc_unmerged,
        "accuracy_after_merge": acc_merged,
        "accuracy_stock_peft": acc_stock,
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
                "load_base": load_base, "tokenizer": tokenizer}
    return summary


if __name__ == "__main__":
    main()
