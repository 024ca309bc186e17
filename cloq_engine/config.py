"""Validated configuration dataclasses: data and checks only, no behaviour."""
from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union


class QuantMethod(str, enum.Enum):
    RTN = "rtn"
    GPTQ = "gptq"
    NF4 = "nf4"


class InitMethod(str, enum.Enum):
    CLOQ = "cloq"
    QUAILORA = "quailora"
    LOFTQ = "loftq"
    SVD = "svd"
    ZERO = "zero"


class SVDSolver(str, enum.Enum):
    """How the calibrated inits take the truncated SVD of the whitened error."""

    AUTO = "auto"
    EXACT = "exact"
    RANDOMIZED = "randomized"
    KRYLOV = "krylov"


SUPPORTED_BITS = (2, 3, 4)
# llama.cpp lattices (quant.grids): name -> (bits, symmetric); every one stores groups of 32
GRID_LATTICES = {"q4_1": (4, False), "q4_k": (4, False), "q3_k": (3, True), "q2_k": (2, False), "q4_0": (4, True)}
# QuantConfig.grid_fallback: what a layer whose in_features no k-quant block divides is quantized on
# (quant.grids.layer_config): "llama.cpp" the type llama.cpp's quantizer falls back to, at its bits (Q2_K/Q3_K
# -> 4-bit Q4_0); "same-bits" our own grid at the config's bits (records written before the field)
GRID_FALLBACKS = ("llama.cpp", "same-bits")
# LoRAConfig.lora_dtype: the trainable factors' dtype (see LoRAConfig)
LORA_DTYPES = ("auto", "base", "float32", "bfloat16", "float16")
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


def _check_optional_int(value, field: str, minimum: int) -> None:
    if value is not None and not (_is_int(value) and value >= minimum):
        raise ValueError(f"`{field}` must be None or an integer >= {minimum}; got {value!r}")


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
        grid: None (our own: free float16 scale, integer zero) or a llama.cpp lattice, "q4_1",
            "q4_k", "q3_k" or "q2_k" (``quant.grids``): RTN and GPTQ choose every group's scale and
            zero on it, so that the weight is exactly that GGUF type; needs the grid's bits, sym,
            group_size=32 and method "rtn" or "gptq". "q4_0" (4-bit, symmetric) is ggml's Q4_0.
        grid_fallback: with a k-quant grid, what a layer whose in_features is not a multiple of 256
            is quantized on: "llama.cpp" (default) the type llama.cpp's own quantizer falls back to,
            at its bits (q2_k, q3_k: 4-bit Q4_0; q4_k: Q4_1, as Q5_0 would need 5-bit codes), so the
            file is what llama-quantize writes for that layer; "same-bits" our own grid at `bits`
            (written as Q4_0: the bytes of 4 bits for 2- or 3-bit quality).
    """

    bits: int = 4
    group_size: int = 128
    method: Union[QuantMethod, str] = QuantMethod.GPTQ
    sym: bool = False
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    mse_clip: bool = False
    grid: Optional[str] = None
    grid_fallback: str = "llama.cpp"

    def __post_init__(self):
        object.__setattr__(self, "method", _enum_field(QuantMethod, self.method, "method"))
        if self.grid_fallback not in GRID_FALLBACKS:
            raise ValueError(f"`grid_fallback` must be one of {GRID_FALLBACKS}; got {self.grid_fallback!r}")
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
        if self.grid is not None:
            self._check_grid()

    def _check_grid(self) -> None:
        name = str(self.grid).lower() if isinstance(self.grid, str) else None
        if name not in GRID_LATTICES:
            raise ValueError(f"`grid` must be None or one of {tuple(GRID_LATTICES)}; got {self.grid!r}")
        object.__setattr__(self, "grid", name)
        bits, sym = GRID_LATTICES[name]
        need = {"bits": bits, "sym": sym, "group_size": 32}
        wrong = {k: getattr(self, k) for k, v in need.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"grid={name!r} needs " + ", ".join(f"{k}={need[k]!r}" for k in wrong)
                             + "; got " + ", ".join(f"{k}={v!r}" for k, v in wrong.items()))
        if self.method not in (QuantMethod.RTN, QuantMethod.GPTQ):
            raise ValueError(f"grid={name!r} needs method 'rtn' or 'gptq'; got {self.method.value!r}")
        if self.mse_clip:
            raise ValueError(f"grid={name!r} chooses its own scales: mse_clip must be False")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("grid") and "grid_fallback" not in d:  # recorded before the field: fallback layers kept the bits
            d = {**d, "grid_fallback": "same-bits"}
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
        rank_pattern: per-layer ranks overriding `rank`, as PEFT's `rank_pattern`: a key matches a
            layer name equal to it or ending in "." + key (regex allowed); the scaling of such a
            layer is alpha / its rank.
        init_solver: truncated SVD used by the calibrated inits: "auto" (exact for small layers,
            block Krylov for large), "exact", "randomized" (power iterations) or "krylov".
        init_power_iters: iterations of the randomized/Krylov solvers; None (default) iterates
            until the captured energy stops changing.
        init_damp: damping of H for the calibrated inits, as a fraction of mean(diag H); grown
            only when the Cholesky fails.
        init_iters: QuAILoRA sweeps or LoftQ alternations; None = the method's default (20 / 5).
        requant_rounds: joint re-quantization for "cloq"/"quailora": up to this many rounds of
            Q <- quantize(W - scaling·B·A, H), (A, B) <- init(W - Q, H), keeping the best; 0 = off.
        requant_tol: stop re-quantizing when a round improves the calibrated objective by less
            than this fraction.
        balance: re-split each non-zero init's ``scaling·B·A`` so that B and A carry equal singular
            values in weight space (the product, hence the init's objective, is unchanged). None
            (default): on for the calibrated inits (cloq, quailora), off for the others; True/False:
            for every non-zero init / never (False gives CLoQ's split as published). CLoQ's
            own split is balanced in the whitened space, which leaves A ~25x smaller than B on
            MiniLM; Adam's steps are about ``lr`` in size whatever a factor's scale, so such an A
            moves ~25x faster relative to its size than B (see the README's fine-tuning study).
        lora_dtype: the dtype of the trainable factors A and B. "auto" (default): float32 when the
            layer they replace is bf16/fp16, else its own dtype (float32, or float64), as PEFT's
            ``autocast_adapter_dtype=True`` keeps adapters: lr-sized steps round away on bf16
            factors, and AMP's fp16 gradient scaler refuses fp16 parameters. "base": the dtype of
            the layer replaced (PEFT's ``autocast_adapter_dtype=False``; half the factor memory
            and optimizer state on a bf16 model). Or "float32" / "bfloat16" / "float16" whatever
            the model's dtype. Applies when a model is prepared and whenever a checkpoint is
            loaded, at any load dtype; ``model.to(dtype)`` still casts everything, as for any module.
    """

    rank: int = 16
    alpha: float = 16
    dropout: float = 0.0
    init: Union[InitMethod, str] = InitMethod.CLOQ
    target_modules: Union[str, Sequence[str]] = "all-linear"
    exclude: Sequence[str] = ("lm_head",)
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    init_solver: Union[SVDSolver, str] = SVDSolver.AUTO
    init_power_iters: Optional[int] = None
    init_damp: float = 1e-6
    init_iters: Optional[int] = None
    requant_rounds: int = 0
    requant_tol: float = 1e-3
    balance: Optional[bool] = None
    lora_dtype: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "init", _enum_field(InitMethod, self.init, "init"))
        name = self.lora_dtype if isinstance(self.lora_dtype, str) else str(self.lora_dtype).replace("torch.", "")
        if name not in LORA_DTYPES:  # a torch.dtype is accepted by its name (config.py imports no torch)
            raise ValueError(f"`lora_dtype` must be one of {LORA_DTYPES}; got {self.lora_dtype!r}")
        object.__setattr__(self, "lora_dtype", name)
        object.__setattr__(self, "init_solver", _enum_field(SVDSolver, self.init_solver, "init_solver"))
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
        if self.balance is not None:
            _check_bool(self, "balance")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.rank_pattern, Mapping) or not all(
            isinstance(k, str) and _is_int(v) and v >= 1 for k, v in self.rank_pattern.items()
        ):
            raise ValueError(f"`rank_pattern` must map layer names to positive integers; got {self.rank_pattern!r}")
        for key in self.rank_pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"`rank_pattern` key {key!r} is not a valid regex: {e}") from None
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        _check_optional_int(self.init_power_iters, "init_power_iters", 0)
        _check_optional_int(self.init_iters, "init_iters", 1)
        if isinstance(self.init_damp, bool) or not (
            isinstance(self.init_damp, (int, float)) and math.isfinite(self.init_damp) and 0 <= self.init_damp < 1
        ):
            raise ValueError(f"`init_damp` must be a finite number in [0, 1); got {self.init_damp!r}")
        if not (_is_int(self.requant_rounds) and self.requant_rounds >= 0):
            raise ValueError(f"`requant_rounds` must be a non-negative integer; got {self.requant_rounds!r}")
        if self.requant_rounds and self.init not in (InitMethod.CLOQ, InitMethod.QUAILORA):
            raise ValueError(f"`requant_rounds` needs init='cloq' or 'quailora'; got init={self.init.value!r}")
        if isinstance(self.requant_tol, bool) or not (
            isinstance(self.requant_tol, (int, float)) and math.isfinite(self.requant_tol) and 0 <= self.requant_tol < 1
        ):
            raise ValueError(f"`requant_tol` must be a finite number in [0, 1); got {self.requant_tol!r}")

    @property
    def scaling(self) -> float:
        return self.scaling_for_rank(self.rank)

    def scaling_for_rank(self, rank: int) -> float:
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def rank_for(self, name: str) -> int:
        """The rank of layer ``name``: the first matching `rank_pattern` key (PEFT's rule), else `rank`."""
        if name in self.rank_pattern:
            return self.rank_pattern[name]
        for key, rank in self.rank_pattern.items():
            if name.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", name):
                return rank
        return self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["init"] = self.init.value
        d["init_solver"] = self.init_solver.value
        d["target_modules"] = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {"balance": False, **d}  # a record from before the field describes unbalanced factors
        return cls(**{k: v for k, v in d.items() if k in names})

    def balances(self) -> bool:
        """Whether a non-zero init's factors are re-split with equal scales (see ``balance``)."""
        if self.balance is None:
            return self.init in (InitMethod.CLOQ, InitMethod.QUAILORA)
        return self.balance
