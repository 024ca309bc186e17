"""Validated configuration dataclasses: data and checks only, no behaviour."""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Sequence, Union


class QuantMethod(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    NF4 = "nf4"


class InitMethod(str, enum.Enum):
    CLOQ = "cloq"
    QUAILORA = "quailora"
    LOFTQ = "loftq"
    ZERO = "zero"


SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bool(config, field: str) -> None:
    if not isinstance(getattr(config, field), bool):
        raise ValueError(f"`{field}` must be True or False; got {getattr(config, field)!r}")


def _check_names(value, field: str) -> None:
    if isinstance(value, str):
        return
    try:
        names = list(value)
    except TypeError:
        raise ValueError(f"`{field}` must be a string or a sequence of strings; got {value!r}") from None
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"`{field}` must be a string or a sequence of strings; got {value!r}")


def _enum_field(cls, value, field: str):
    try:
        return cls(value.value if isinstance(value, enum.Enum) else str(value).lower())
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"`{field}` must be one of {allowed}; got {value!r}") from None


@dataclass(frozen=True)
class QuantConfig:
    """How base weights are quantized.

    Args:
        bits: code width, 2, 3 or 4 (NF4 needs 4).
        group_size: input columns sharing one scale/zero (NF4: one absmax), 32, 64, 128, or -1 for
            one group over all of `in_features`.
        method: "rtn" (round to nearest), "gptq" (calibrated, needs H = X^T X) or "nf4".
        sym: symmetric quantization (zero fixed at the middle code) instead of min-max asymmetric.
        damp: GPTQ damping as a fraction of mean(diag H); grown automatically if Cholesky fails.
        act_order: GPTQ processes columns by decreasing H diagonal; groups stay static so the
            stored format does not change.
        block_size: GPTQ column block (lazy batch update width).
        mse_clip: RTN searches a shrink factor of the min-max range per group minimising error.
    """

    bits: int = 4
    group_size: int = 128
    method: Union[QuantMethod, str] = QuantMethod.GPTQ
    sym: bool = False
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    mse_clip: bool = False

    def __post_init__(self):
        object.__setattr__(self, "method", _enum_field(QuantMethod, self.method, "method"))
        if not _is_int(self.bits) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"`bits` must be one of {SUPPORTED_BITS}; got {self.bits!r}")
        if not _is_int(self.group_size) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"`group_size` must be one of {SUPPORTED_GROUP_SIZES}; got {self.group_size!r}")
        if self.method == QuantMethod.NF4 and self.bits != 4:
            raise ValueError(f"`bits` must be 4 for method='nf4'; got {self.bits!r}")
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and 0 <= self.damp < 1):
            raise ValueError(f"`damp` must be a finite number in [0, 1); got {self.damp!r}")
        if not (_is_int(self.block_size) and self.block_size >= 1):
            raise ValueError(f"`block_size` must be a positive integer; got {self.block_size!r}")
        for name in ("sym", "act_order", "mse_clip"):
            _check_bool(self, name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class LoRAConfig:
    """The LoRA branch and how it is initialised.

    Args:
        rank: LoRA rank r (A is (r, in), B is (out, r)).
        alpha: scaling numerator; scaling = alpha / r (alpha / sqrt(r) with use_rslora).
        dropout: dropout on the LoRA input during training.
        init: "cloq" (calibrated closed form), "quailora" (calibrated ALS), "loftq", or "zero".
        target_modules: "all-linear", a list of names or name suffixes, or a regex string.
        exclude: names or suffixes never replaced.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
    """

    rank: int = 16
    alpha: float = 16
    dropout: float = 0.0
    init: Union[InitMethod, str] = InitMethod.CLOQ
    target_modules: Union[str, Sequence[str]] = "all-linear"
    exclude: Sequence[str] = ("lm_head",)
    use_rslora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "init", _enum_field(InitMethod, self.init, "init"))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank` must be a positive integer; got {self.rank!r}")
        if isinstance(self.alpha, bool) or not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"`alpha` must be a positive finite number; got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}")
        _check_names(self.target_modules, "target_modules")
        _check_names(self.exclude, "exclude")
        _check_bool(self, "use_rslora")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["init"] = self.init.value
        d["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
