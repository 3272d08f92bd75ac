"""The LLaMA example's offline task: word problems, a word-level tokenizer and a tiny pretrained LLaMA.

The base is pretrained fully (deterministic, cached with a recipe stamp) on one family of procedurally
generated problems ("Tom has 3 apples and buys 4 more . How many apples does Tom have ?" -> "The answer
is 7", and "gives away"); ResLoRA then fine-tunes it on another phrasing with new verbs ("Tom had 3
apples . Then he found 4 more . How many apples does Tom have now ?", and "lost").

Also the question/answer format the example shares with its hub mode: loss-masked prompt tokenization,
the collate and the greedy exact-match metric (``qa_task``). ``train(argv)`` runs the offline task
through the fine-tuning driver, as ``examples/train_llama_reslora.py`` does in offline mode.
"""

from __future__ import annotations

import random
import re

import torch

from ..integrations import transformers_finetune as finetune

NAMES = [("Tom", "he"), ("Ben", "he"), ("Sam", "he"), ("Jack", "he"), ("Anna", "she"), ("Lucy", "she"),
         ("Mia", "she"), ("Emma", "she")]
OBJECTS = ["apples", "pens", "books", "cards", "coins", "eggs", "toys", "stamps"]
MAX_OPERAND = 9
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
ANSWER_RE = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
OFFLINE_DEFAULTS = dict(pretrain_steps=600, hidden_size=64, num_layers=4, num_train=2000, num_eval=300)
TRAINING_DEFAULTS = dict(learning_rate=3e-3, num_train_epochs=4, per_device_train_batch_size=32,
                         per_device_eval_batch_size=100)


# ------------------------------------------------------------------------------ word problems
#: (addition, subtraction) templates per family; the fine-tuning verbs ('found', 'lost') are new to the base
TEMPLATES = {
    "pretrain": ("{name} has {a} {obj} and buys {b} more . How many {obj} does {name} have ?",
                 "{name} has {a} {obj} and gives away {b} . How many {obj} does {name} have ?"),
    "finetune": ("{name} had {a} {obj} . Then {pron} found {b} more . How many {obj} does {name} have now ?",
                 "{name} had {a} {obj} . Then {pron} lost {b} . How many {obj} does {name} have now ?"),
}


def _problem(rng, kind: str) -> tuple[str, int]:
    """One problem of the family: a sum, or a difference that stays >= 0."""
    (name, pron), obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    add, subtract = TEMPLATES[kind]
    if rng.random() < 0.5:
        return add.format(name=name, pron=pron, obj=obj, a=a, b=b), a + b
    a, b = max(a, b), min(a, b)
    return subtract.format(name=name, pron=pron, obj=obj, a=a, b=b), a - b


def offline_problems(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` problems of the "pretrain" or "finetune" family as {prompt, completion, answer}."""
    rng = random.Random(seed)
    kind = "pretrain" if kind == "pretrain" else "finetune"
    out = []
    for _ in range(n):
        question, answer = _problem(rng, kind)
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


def offline_config(tokenizer, hidden_size: int, num_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


# ------------------------------------------------------------------ question/answer format
def normalize_number(text) -> str:
    """'1,200' -> '1200', '3.0' -> '3', '2.5' -> '2.5'; non-numbers unchanged."""
    text = str(text).strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def prompt_text(example: dict, offline: bool) -> str:
    return example["prompt"] if offline else f"Question: {example['prompt']}\nAnswer:"


def tokenize_examples(examples: list[dict], tokenizer, max_length: int = 512, offline: bool = True) -> list[dict]:
    """Prompt tokens (loss-masked) + completion tokens + EOS."""
    out = []
    for e in examples:
        prompt = tokenizer(prompt_text(e, offline))["input_ids"]
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
    return normalize_number(match[-1]) if match else None


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
            enc = tokenizer([prompt_text(e, offline) for e in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            flags += [int(extract_answer(t) == e["answer"]) for t, e in zip(texts, chunk)]
    finally:
        model.train(was_training)
    return flags


# ---------------------------------------------------------------------------- offline base
def _pretrain_and_save(base_dir: str, *, hidden_size: int, num_layers: int, pretrain_steps: int, seed: int) -> dict:
    from transformers import LlamaForCausalLM

    tokenizer = build_offline_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(offline_config(tokenizer, hidden_size, num_layers))
    train = tokenize_examples(offline_problems("pretrain", 4000, seed + 1), tokenizer)
    collate = lambda ex: train_collate(ex, tokenizer.pad_token_id)  # noqa: E731
    warmup_then_decay = lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / max(pretrain_steps, 1))  # noqa: E731
    finetune.pretrain_offline_base(model, train, collate, steps=pretrain_steps, lr=3e-3, seed=seed,
                                   lr_lambda=warmup_then_decay)
    evaluation = offline_problems("pretrain", 200, seed + 2)
    correct = sum(generate_answers(model, tokenizer, evaluation, 100, 6, torch.device("cpu")))
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return {"pretrain_eval_exact_match": correct / len(evaluation)}


def build_offline_base(base_dir: str, **recipe) -> None:
    """Pretrain the tiny LLaMA fully on the base problem family and save model and tokenizer (deterministic;
    cached: skipped when ``base_dir`` holds the same recipe). ``recipe``: hidden_size, num_layers,
    pretrain_steps, seed."""
    finetune.ensure_offline_base(base_dir, _pretrain_and_save, {"task": "has/buys/gives-away", "version": 1}, **recipe)


# ------------------------------------------------------------------------------------ task
def parser(doc: str = __doc__):
    """The flags of the LLaMA example without its hub data flags (the offline task's defaults)."""
    model_help = "Hub id or local path of a LLaMA-family causal LM. Omit for offline mode."
    p = finetune.finetune_parser(doc, model_help=model_help, target_modules=["q_proj", "v_proj"], max_length=512,
                                 offline_defaults=OFFLINE_DEFAULTS, training_defaults=TRAINING_DEFAULTS)
    p.add_argument("--max_new_tokens", type=int, default=None, help="Generation budget (offline 6, hub 256).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Non-reentrant gradient checkpointing (reentrant is wrong for is/ms).")
    return p


def finish_llama_args(args):
    """``finetune.finish_args`` and the generation budget of the mode."""
    finetune.finish_args(args, "llama", hub_label="hub")
    if args.max_new_tokens is None:
        args.max_new_tokens = 6 if args.offline else 256
    return args


def qa_task(args, accelerator, base_path: str, train_examples: list[dict], eval_examples: list[dict],
            label: str) -> finetune.FineTuneTask:
    """Causal-LM fine-tuning on {prompt, completion, answer} examples, measured by greedy exact match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    def evaluate(model, examples) -> dict:
        """Exact match: each process generates for its shard, the counts are summed over processes."""
        with accelerator.split_between_processes(list(range(len(examples)))) as idx:
            flags = generate_answers(accelerator.unwrap_model(model), tokenizer, [examples[i] for i in idx],
                                     args.per_device_eval_batch_size, args.max_new_tokens, accelerator.device,
                                     args.offline)
        flags = torch.tensor(flags, dtype=torch.long, device=accelerator.device)
        total = torch.tensor(len(flags), device=accelerator.device)
        counts = accelerator.reduce(torch.stack([flags.sum(), total]), "sum")
        return {"exact_match": float(counts[0]) / max(float(counts[1]), 1.0)}

    def configure_model(model):
        model.config.use_cache = True
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    return finetune.FineTuneTask(
        name="llama", label=label, base_path=base_path,
        load_base=lambda: AutoModelForCausalLM.from_pretrained(base_path),
        train_set=tokenize_examples(train_examples, tokenizer, args.max_length, args.offline),
        collate=lambda ex: train_collate(ex, tokenizer.pad_token_id), eval_data=eval_examples, evaluate=evaluate,
        metric="exact_match", task_type="CAUSAL_LM", target_modules=args.target_modules,
        configure_model=configure_model, save_extras=tokenizer.save_pretrained,
        summary_extras=lambda _metrics: {"metric": "exact_match"},
    )


def offline_task(args, accelerator) -> finetune.FineTuneTask:
    """The tiny base (pretrained once, cached) fine-tuned on the had/found/lost problems."""
    base_path = finetune.offline_base_path(args, accelerator, build_offline_base)
    train_examples = offline_problems("finetune", args.offline_num_train, args.seed + 3)
    eval_examples = offline_problems("finetune", args.offline_num_eval, args.seed + 4)
    return qa_task(args, accelerator, base_path, train_examples, eval_examples, "offline-had/found/lost")


def train(argv=None, return_state: bool = False):
    """The offline task through the driver, with the LLaMA example's flags; returns its summary."""
    args = parser().parse_args(argv)
    args.offline = True
    finish_llama_args(args)
    return finetune.run(args, offline_task, return_state=return_state)
