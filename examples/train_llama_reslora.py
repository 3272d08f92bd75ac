#!/usr/bin/env python
"""Causal-LM fine-tuning with ResLoRA (arXiv 2402.18039) on a LLaMA-family model, with Accelerate.

Question/answer text in the SVAMP/GSM8K style: the model reads a word problem and writes its
solution ending in "The answer is N". ResLoRA adapts ``q_proj``/``v_proj`` (the paper's NLG setting
is r=4, alpha=8; the default alpha is the rank, so pass ``--lora_alpha 8`` for it). After training the
adapter is merged into a plain LoRA (``--merge``), exact-match accuracy of greedy generation is measured
before and after merging, the plain LoRA is saved in peft format, and the script checks that stock
``PeftModel.from_pretrained`` loads it and reproduces the merged accuracy.

Hub mode (needs the hub): any LLaMA-family model and a dataset with question/answer columns
(``openai/gsm8k`` ``main``: question/answer with "#### N"; ``ChilleD/SVAMP``: Body/Question/Answer;
or any dataset with ``question`` and ``answer`` columns):

    accelerate launch examples/train_llama_reslora.py --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --dataset_name ChilleD/SVAMP --reslora_structure is --rank 4 --lora_alpha 8 --learning_rate 3e-4 \\
        --num_train_epochs 3 --per_device_train_batch_size 4 --max_new_tokens 256 --output_dir out/llama-svamp-is

Offline mode (default when no model is given, or ``--offline``): a word-level tokenizer and a tiny
``LlamaForCausalLM`` are built in code. The base is first pretrained fully (deterministic, cached in
``<output_dir>/base_model`` or ``--offline_base_dir``) on one family of procedurally generated
problems ("Tom has 3 apples and buys 4 more . How many apples does Tom have ?" -> "The answer is
7", and "gives away"); ResLoRA then fine-tunes it on another phrasing with new verbs ("Tom had 3
apples . Then he found 4 more . How many apples does Tom have now ?", and "lost"):

    python examples/train_llama_reslora.py --reslora_structure ms --output_dir /tmp/llama-ms

The last stdout line is a JSON summary: exact-match accuracy before fine-tuning, before merging (the
unmerged ResLoRA model), after merging, after the stock-peft load, the merge error and logit
differences.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reslora_diffusers.demo.tiny_llama_task import finish_llama_args, normalize_number, offline_task, parser, qa_task
from reslora_diffusers.integrations.transformers_finetune import run


# ----------------------------------------------------------------------------- hub datasets
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
            answer = normalize_number(row["Answer"])
            return {"prompt": question, "completion": f"The answer is {answer}", "answer": answer}
        question, solution = row["question"], str(row["answer"])
        if "####" in solution:  # GSM8K: reasoning, then '#### N'
            reasoning, answer = solution.split("####")
            reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
            answer = normalize_number(answer)
            return {"prompt": question, "completion": f"{reasoning} The answer is {answer}", "answer": answer}
        answer = normalize_number(solution)
        return {"prompt": question, "completion": f"The answer is {answer}", "answer": answer}

    train = [convert(r) for r in raw[train_split]]
    evaluation = [convert(r) for r in raw[eval_split]]
    if args.max_train_samples:
        train = train[: args.max_train_samples]
    if args.max_eval_samples:
        evaluation = evaluation[: args.max_eval_samples]
    return train, evaluation


def hub_task(args, accelerator):
    """The hub model fine-tuned on the hub dataset's question/answer pairs."""
    with accelerator.main_process_first():
        train_examples, eval_examples = hub_problems(args)
    return qa_task(args, accelerator, args.model_name_or_path, train_examples, eval_examples, args.dataset_name)


# -------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = parser(__doc__)
    hub = p.add_argument_group("hub mode")
    hub.add_argument("--dataset_name", default="ChilleD/SVAMP", help="Dataset id (hub mode).")
    hub.add_argument("--dataset_config_name", default=None, help="e.g. 'main' for openai/gsm8k.")
    return finish_llama_args(p.parse_args(argv))


def main(argv=None, return_state: bool = False):
    args = parse_args(argv)
    return run(args, offline_task if args.offline else hub_task, return_state=return_state)


if __name__ == "__main__":
    main()
