"""The RoBERTa example's offline task: a synthetic counting task and a tiny pretrained RoBERTa.

A tiny RoBERTa built from a ``RobertaConfig`` is pretrained fully, deterministically, on "does marker A
occur more often than marker B?" (cached with a recipe stamp). ResLoRA then fine-tunes it on a related
task with other markers ("more C than D?", with A and B left in as distractors), where the base is at
chance.

Also the classification task the example shares with its hub mode (``classification_task``: the
classifier head trained and exported, metrics gathered over processes). ``train(argv)`` runs the offline
task through the fine-tuning driver, as ``examples/train_roberta_glue_reslora.py`` does in offline mode.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from ..integrations import transformers_finetune as finetune

# Token ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, 4 <mask>, then markers, then filler tokens.
BOS, PAD, EOS = 0, 1, 2
MARK_A, MARK_B, MARK_C, MARK_D = 5, 6, 7, 8
FIRST_FILLER = 13
OFFLINE_VOCAB = 48
OFFLINE_DEFAULTS = dict(pretrain_steps=300, hidden_size=64, num_layers=3, num_train=2000, num_eval=500)
TRAINING_DEFAULTS = dict(learning_rate=3e-3, num_train_epochs=3, per_device_train_batch_size=32)


# ------------------------------------------------------------------------------ counting task
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


def offline_config(hidden_size: int, num_layers: int):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=OFFLINE_VOCAB, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=40,
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


# ---------------------------------------------------------------------------- offline base
@torch.no_grad()
def _accuracy(model, examples: list[dict]) -> float:
    correct = 0
    for batch in torch.utils.data.DataLoader(examples, batch_size=256, collate_fn=pad_collate):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(examples)


def _pretrain_and_save(base_dir: str, *, hidden_size: int, num_layers: int, pretrain_steps: int, seed: int) -> dict:
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(offline_config(hidden_size, num_layers))
    train, evaluation = offline_pretrain_task(seed)
    finetune.pretrain_offline_base(model, train, pad_collate, steps=pretrain_steps, lr=2e-3, seed=seed)
    pretrain_eval_accuracy = _accuracy(model, evaluation)
    model.save_pretrained(base_dir)
    return {"pretrain_eval_accuracy": pretrain_eval_accuracy}


def build_offline_base(base_dir: str, **recipe) -> None:
    """Pretrain the tiny RoBERTa fully on the more-A-than-B task and save it (deterministic, single process;
    cached: skipped when ``base_dir`` holds the same recipe). ``recipe``: hidden_size, num_layers,
    pretrain_steps, seed."""
    finetune.ensure_offline_base(base_dir, _pretrain_and_save, {"task": "more-A-than-B", "version": 2}, **recipe)


# ------------------------------------------------------------------------------------ task
def parser(doc: str = __doc__):
    """The flags of the RoBERTa example without its hub task flag (the offline task's defaults)."""
    model_help = "Hub id or local path of a RoBERTa-family model (e.g. roberta-large). Omit for offline mode."
    p = finetune.finetune_parser(doc, model_help=model_help, target_modules=["query", "value"], max_length=128,
                                 offline_defaults=OFFLINE_DEFAULTS, training_defaults=TRAINING_DEFAULTS)
    p.add_argument("--freeze_classifier", action="store_true",
                   help="Freeze the classification head as the paper's code did (not recommended).")
    return p


def accuracy(preds, labels) -> dict:
    return {"accuracy": float((preds == labels).mean()) if len(labels) else 0.0}


def classification_task(args, accelerator, *, label: str, base_path: str, train_set, eval_set, collate,
                        compute_metrics: Callable = accuracy,
                        model_kwargs: dict | None = None) -> finetune.FineTuneTask:
    """Sequence classification (or regression, ``problem_type="regression"``) with the head trained and exported.

    ``compute_metrics(preds, labels)`` gets numpy arrays of the whole eval set, gathered over processes.
    """
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification

    model_kwargs = model_kwargs or {}
    is_regression = model_kwargs.get("problem_type") == "regression"

    def load_base():
        set_seed(args.seed)  # the same classifier init every time a new head is created
        return AutoModelForSequenceClassification.from_pretrained(base_path, **model_kwargs)

    @torch.no_grad()
    def evaluate(model, loader) -> dict:
        model.eval()
        preds, refs = [], []
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            pred = logits.squeeze(-1) if is_regression else logits.argmax(dim=-1)
            pred, labels = accelerator.gather_for_metrics((pred, labels))
            preds.append(pred.float().cpu() if is_regression else pred.cpu())
            refs.append(labels.cpu())
        model.train()
        return compute_metrics(torch.cat(preds).numpy(), torch.cat(refs).numpy())

    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate)
    return finetune.FineTuneTask(
        name="roberta", label=label, base_path=base_path, load_base=load_base, train_set=train_set, collate=collate,
        eval_data=eval_loader, evaluate=evaluate, metric="accuracy", task_type="SEQ_CLS",
        target_modules=args.target_modules, modules_to_save=None if args.freeze_classifier else ["classifier"],
        summary_extras=lambda m: {"metrics_before_merge": m["before_merge"], "metrics_after_merge": m["after_merge"],
                                  "metrics_stock_peft": m["stock_peft"]},
    )


def offline_task(args, accelerator) -> finetune.FineTuneTask:
    """The tiny base (pretrained once, cached) fine-tuned on more-C-than-D."""
    base_path = finetune.offline_base_path(args, accelerator, build_offline_base)
    train_set, eval_set = offline_finetune_task(args.seed, args.offline_num_train, args.offline_num_eval)
    return classification_task(args, accelerator, label="offline-more-C-than-D", base_path=base_path,
                               train_set=train_set, eval_set=eval_set, collate=pad_collate)


def train(argv=None, return_state: bool = False):
    """The offline task through the driver, with the RoBERTa example's flags; returns its summary."""
    args = parser().parse_args(argv)
    args.offline = True
    finetune.finish_args(args, "roberta", hub_label="offline")
    return finetune.run(args, offline_task, return_state=return_state)
