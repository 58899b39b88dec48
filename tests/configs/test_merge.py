"""One merge and one override syntax (dinolab.configs.merge), and train's overrides anywhere on its line."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dinolab.cli import build_parser, parse_args
from dinolab.configs.merge import is_field_override, looks_like_override, merge, parse_overrides
from dinolab.configs.schema import CHOICES, load_config


@dataclass
class Inner:
    k: int = 3
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    lr: float = 0.5
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def test_layers_then_overrides_later_ones_win() -> None:
    cfg = merge(Outer, [{"lr": 0.1, "inner": {"k": 4}}], ["inner.k=5", "inner.names=[x,y]", "lr=2"])
    assert cfg == Outer(lr=2.0, inner=Inner(k=5, names=["x", "y"]))
    assert merge(Outer) == Outer()


@pytest.mark.parametrize("item,message", [
    ("inner.kk=1", r"^invalid config: Key 'kk' not in 'Inner'"),
    ("inner.k=abc", r"^invalid config: inner.k: Value 'abc' of type 'str' could not be converted to Integer"),
    ("lr", r"^override 'lr' must be key=value"),
    ("=1", r"^override '=1' must be key=value"),
    ("inner.names=[1,2", r"^override 'inner.names=\[1,2': the value is not valid YAML"),
])
def test_each_mistake_is_one_line_naming_the_key(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        merge(Outer, overrides=[item])
    assert "\n" not in str(err.value)


def test_the_dataclass_validates_the_values() -> None:
    with pytest.raises(ValueError, match="^lr must be positive, got -1.0$"):
        merge(Outer, overrides=["lr=-1"])


def test_override_syntax() -> None:
    assert parse_overrides(["a.b=1", "c=[2,3]"]) == {"a": {"b": 1}, "c": [2, 3]}
    assert [looks_like_override(s) for s in ("a=1", "a.b=", "=1", "a", "--x=1")] == [True, True, False, False, False]
    assert is_field_override("inner.k=1", Outer) and not is_field_override("train=/data", Outer)


def test_train_overrides_anywhere_on_the_line() -> None:
    args = parse_args(build_parser(), ["train", "optim.epochs=3", "--output", "o", "train.seed=2", "--preset", "cpu",
                                       "crops.local_crops_number=2"])
    assert args.overrides == ["optim.epochs=3", "train.seed=2", "crops.local_crops_number=2"]
    cfg = load_config(args.preset, args.overrides)
    assert (cfg.optim.epochs, cfg.train.seed, cfg.crops.local_crops_number) == (3, 2, 2)


def test_an_unknown_option_is_still_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "--output", "o", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_choice_errors_name_every_accepted_value() -> None:
    assert CHOICES["student.ffn_layer"] == ("mlp", "swiglu", "swiglufused")
    with pytest.raises(ValueError, match=r"^student.ffn_layer must be 'mlp', 'swiglu' or 'swiglufused', got 'glu'$"):
        load_config("cpu", ["student.ffn_layer=glu"])
    with pytest.raises(ValueError, match=r"^train.distributed must be 'fsdp' or 'ddp', got 'dp'$"):
        load_config("cpu", ["train.distributed=dp"])
    assert load_config("cpu", ["student.ffn_layer=swiglu"]).student.ffn_layer == "swiglu"
