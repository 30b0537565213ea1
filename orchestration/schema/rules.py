"""What config values may be (orchestration/schema checks them): `Rule`s and the `RULES` table.

The tree of defaults in conf/ says which keys exist and their types; a rule only narrows a
key's values (ranges, allowed strings, null, `auto`). A rule for a key that is not in the
tree is never used, so other branches can add keys to conf/ without touching this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["RULES", "Int", "Num", "One", "Rule", "rule_for", "type_rule"]


@dataclass(frozen=True)
class Rule:
    """What a key accepts beyond the type of its default.

    kind: "int" | "float" | "bool" | "str" | "any"; choices: allowed strings (compared as
    written); ge/gt/le: bounds for numbers; null: null allowed; auto: the string "auto"
    allowed besides the numbers / bools.
    """

    kind: str = "any"
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    null: bool = False
    auto: bool = False

    def describe(self) -> str:
        parts = []
        if self.choices:
            parts.append(" | ".join(self.choices))
        elif self.kind in ("int", "float"):
            rng = [f">= {_num(self.ge)}" if self.ge is not None else "",
                   f"> {_num(self.gt)}" if self.gt is not None else "",
                   f"<= {_num(self.le)}" if self.le is not None else ""]
            parts.append(f"{'an integer' if self.kind == 'int' else 'a number'} "
                         f"{' and '.join(r for r in rng if r)}".strip())
        elif self.kind == "bool":
            parts.append("true | false")
        if self.auto:
            parts.append("auto")
        if self.null:
            parts.append("null")
        return " or ".join(parts)

    def accepts(self, v: Any) -> bool:
        if v is None:
            return self.null
        if self.auto and v == "auto":
            return True
        if self.choices:
            return isinstance(v, str | bool | int) and str(v).lower() in self.choices
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, int | float):
                return False
            if self.kind == "int" and not isinstance(v, int):
                return False
            if isinstance(v, float) and not math.isfinite(v):
                return False
            return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                    and (self.le is None or v <= self.le))
        if self.kind == "str":
            return isinstance(v, str)
        return True


def _num(x: float | None) -> str:
    return f"{x:g}" if x is not None else ""


def Int(ge: float | None = None, *, gt: float | None = None, le: float | None = None,
        null: bool = False, auto: bool = False) -> Rule:
    return Rule("int", ge=ge, gt=gt, le=le, null=null, auto=auto)


def Num(ge: float | None = None, *, gt: float | None = None, le: float | None = None,
        null: bool = False) -> Rule:
    return Rule("float", ge=ge, gt=gt, le=le, null=null)


def One(*choices: str, null: bool = False) -> Rule:
    return Rule("str", choices=tuple(choices), null=null)


PRECISIONS = ("auto", "bf16", "bfloat16", "fp16", "float16", "16", "fp32", "float32", "32")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")

# Narrowing rules (dotted key -> Rule). `*` matches one key level (e.g. augment.*.flip_p).
RULES: dict[str, Rule] = {
    "seed": Int(0),
    "trainer.epochs": Int(1),
    "trainer.max_steps": Int(1, null=True),
    "trainer.batch_size": Int(1),
    "trainer.device": One("auto", "cpu", "cuda"),
    "trainer.precision": One(*PRECISIONS),
    "trainer.channels_last": One("auto", "true", "false"),
    "trainer.compile": Rule("bool"),
    "trainer.grad_clip": Num(gt=0, null=True),
    "trainer.warmup_epochs": Num(0),
    "trainer.loader_backend": One("auto", "dali", "torchvision"),
    "trainer.loader_threads": Int(1, auto=True),
    "trainer.loader_dtype": One(*DTYPES),
    "trainer.hw_decoder_load": Num(0, le=1),
    "trainer.prefetch": Int(1),
    "trainer.num_threads": Int(1, null=True, auto=True),
    "trainer.loader_processes": Int(0, auto=True),
    "trainer.nvjpeg_padding_mib": Int(1, auto=True),
    "trainer.dali_pipeline_depth": Int(1),
    "trainer.checkpoint_every_steps": Int(0),
    "trainer.keep_last": Int(1),
    "trainer.resume": Rule("bool"),
    "trainer.log_every_steps": Int(1),
    "trainer.check_every_steps": Int(1, auto=True),
    "trainer.progress": One("auto", "bar", "log"),
    "trainer.deterministic": Rule("bool"),
    "trainer.dist_timeout_s": Num(gt=0),
    "eval.every_epochs": Int(0),
    "eval.at_end": Rule("bool"),
    "eval.batch_size": Int(1),
    "eval.knn_k": Int(1),
    "eval.knn_t": Num(gt=0),
    "eval.probe": Rule("bool"),
    "eval.probe_epochs": Int(1),
    "eval.probe_lr": Num(gt=0),
    "eval.probe_batch_size": Int(1),
    "data.num_classes": Int(2, null=True),
    "data.image_size": Int(1),
    "data.shuffle_buffer": Int(0),
    "data.exact_epoch": Rule("bool"),
    "data.num_workers": Int(1),
    "data.max_bad_fraction": Num(0, le=1),
    "data.validate": One("header", "decode"),
    "data.max_member_bytes": Int(1024),
    "data.generate": Rule("bool"),
    "data.generate_train_samples": Int(1),
    "data.generate_test_samples": Int(1),
    "data.cache_dir": Rule("str", null=True),
    "data.cache_limit": Int(1, null=True),  # bytes; the job also checks it holds the largest shard
    "optim.lr": Num(0),  # 0: frozen weights (a warm-start check)
    "optim.base_batch": Int(1),
    "optim.scaling": One("linear", "sqrt", "none"),
    "optim.weight_decay": Num(0),
    "optim.momentum": Num(0, le=1),
    "optim.warmup_epochs": Num(0, null=True),
    "augment.*.size": Int(1),
    "augment.*.flip_p": Num(0, le=1),
    "augment.*.jitter_p": Num(0, le=1),
    "augment.*.grayscale_p": Num(0, le=1),
    "augment.*.blur_p": Num(0, le=1),
    "augment.*.solarize_p": Num(0, le=1),
    "augment.*.hue": Num(0, le=0.5),
    "tracking.enabled": Rule("bool"),
    "tracking.metrics_queue": Int(1),
    "tracking.metrics_flush_s": Num(0),
    "tracking.registry.margin": Num(0),
    "tracking.http.max_retries": Int(0),
    "tracking.http.timeout_s": Num(gt=0),
    "tracking.probe_timeout_s": Num(gt=0),
    "tracking.reconnect_after_s": Num(gt=0, null=True),
    "tracking.system_metrics_interval_s": Num(gt=0),
    "retrain.enabled": Rule("bool"),
    "retrain.init": One("scratch", "champion"),
    "retrain.nproc_per_node": Int(1),
    "retrain.lock.ttl_s": Num(gt=0),
    "retrain.lock.heartbeat_s": Num(gt=0, null=True),
    "retrain.lock.wait_s": Num(0),
    "retrain.lock.grace_s": Num(0),
    "retrain.lock.held_exit_code": One("0", "3"),
}


def rule_for(key: str) -> Rule | None:
    if key in RULES:
        return RULES[key]
    parts = key.split(".")
    for pattern, rule in RULES.items():
        p = pattern.split(".")
        if "*" in p and len(p) == len(parts) and all(a in ("*", b) for a, b in zip(p, parts, strict=True)):
            return rule
    return None


def type_rule(default: Any) -> Rule | None:
    """The rule implied by the default's type (None: no constraint)."""
    if isinstance(default, bool):
        return Rule("bool")
    if isinstance(default, int):
        return Rule("int")
    if isinstance(default, float):
        return Rule("float")
    return None
