"""The command line is made from the options dataclasses: every verb keeps the flags it had when they were written
by hand (names, dests, kinds), every flag has help under a section of --help, and options reach the dataclass."""

import argparse
import dataclasses
import typing

import pytest

from nakt.batched import PRECISIONS, TTAS
from nakt.cli import VERBS, build_parser, main
from nakt.config import GROUPS, OptionError, option_info
from nakt.fusion import FUSIONS
from nakt.train import TrainOptions

# The flags of the hand-written parser (commit 0320c6e), dumped before the CLI was generated, plus those added
# since (--layout, --compile): ``name:kind``, the dest being the name without ``no-`` and with underscores;
# kinds: a value type (``+``: several values, ``*``: with choices), ``append`` (repeatable), ``true``
# (store_true) and ``false`` (``--no-x``, store_false). finetune and distill have train's flags.
FLAGS = {
    "train": ("alpha:float annotated-classes:str balance-classes:true batch-dice:true batch-size:int "
              "cache-gb:float cases:str channels:str+ compile:true config:str device:str ema:float epochs:int "
              "freeze-encoder-epochs:int fusion:str* hard-labels:true head:str* images:str in-channels:int init:str "
              "label-column:str label-noise:float label-values:int+ labelled-cases:str labelled-images:str "
              "labelled-masks:str labelled-ratio:float labels:str lr:float mask-file:str masks:str "
              "min-confidence:float model:str no-augment:false no-disk-cache:false no-progress:false "
              "normalization:str* num-workers:int orientation:str out:str overwrite:true patch:int+ "
              "patches-per-case:int pixel-weights:str* precision:str* pretrained:str recipe:str* resume:true "
              "seed:int size:int+ spatial-augment:true subset-fraction:float subsets:int task:str* "
              "teacher:append teacher-mode:str* temperature:float unfreeze-every:int val-cases:str "
              "val-fraction:float val-images:str val-labels:str val-masks:str val-metric:str* weight-decay:float"),
    "label": ("batch-size:int cases:str channels:str+ compile:true config:str device:str fusion:str* images:str "
              "label-map:str layout:str* no-progress:false num-parts:int num-workers:int out:str overwrite:true "
              "part-id:int precision:str* save-teacher-probs:true sharpen:float task:str* teacher:append "
              "trust-checkpoint:true tta:str* weighting:str* weights:float+"),
    "predict": ("batch-size:int cases:str channels:str+ compile:true config:str device:str images:str layout:str* "
                "model:str no-progress:false num-workers:int out:str overwrite:true precision:str* save-probs:true "
                "task:str* trust-checkpoint:true tta:str*"),
    "evaluate": ("attack:str* batch-size:int cases:str channels:str+ compile:true config:str cost:true device:str "
                 "eps:float "
                 "graded:true images:str label-column:str labels:str layout:str* mask-file:str masks:str model:str "
                 "no-hd95:false no-progress:false num-workers:int out:str overwrite:true precision:str* "
                 "pred:str roi:str steps:int task:str* trust-checkpoint:true tta:str*"),
    "report": ("cases:str channels:str+ config:str images:str labels:str mask-file:str masks:str "
               "no-progress:false out:str overwrite:true queue:int runs:str+"),
    "export": "atol:float config:str device:str format:str* images:str model:str opset:int out:str overwrite:true",
    "export-nnunet": ("cases:str channel-names:str+ channels:str+ config:str images:str labels:str out:str "
                      "overwrite:true"),
    "demo": "device:str epochs:int out:str",
}
# options fields that are not flags, each declared with option(cli=False)
NOT_FLAGS = {"train": {"model_kwargs"}, "finetune": {"model_kwargs"}, "distill": {"model_kwargs"},
             "demo": {"seed", "progress"}}


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _flags(verb_parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0][2:]: a for a in verb_parser._actions if a.option_strings and a.dest != "help"}


def _kind(action: argparse.Action) -> str:
    kinds = {argparse._StoreTrueAction: "true", argparse._StoreFalseAction: "false", argparse._AppendAction: "append"}
    kind = kinds.get(type(action)) or getattr(action.type, "__name__", "str") + ("+" if action.nargs == "+" else "")
    return kind + ("*" if action.choices else "")


def test_every_verb_keeps_its_flags_names_dests_and_kinds():
    verbs = _verbs(build_parser())
    assert set(verbs) == set(FLAGS) | {"finetune", "distill"} == set(VERBS)
    for verb, parser in verbs.items():
        flags = _flags(parser)
        shown = " ".join(f"{name}:{_kind(a)}" for name, a in sorted(flags.items()))
        assert shown == FLAGS.get(verb, FLAGS["train"]), verb
        for name, action in flags.items():
            assert action.dest == name.removeprefix("no-").replace("-", "_"), name
            assert action.default is None and not action.required, name  # so that --config can fill it
            assert action.help, f"{verb} --{name} has no help"


def test_flags_are_the_options_fields_but_those_kept_off_the_command_line():
    for verb, parser in _verbs(build_parser()).items():
        cls = VERBS[verb].options
        fields = {f.name for f in dataclasses.fields(cls)}
        dests = {a.dest for a in _flags(parser).values()} - {"config"}
        assert fields - dests == NOT_FLAGS.get(verb, set()), verb
        assert dests <= fields, verb
        assert all(not option_info(cls, f)["cli"] for f in fields - dests), verb


def test_choices_come_from_the_modules_and_are_checked_by_the_options():
    flags = {verb: _flags(p) for verb, p in _verbs(build_parser()).items()}
    assert tuple(flags["train"]["fusion"].choices) == tuple(flags["label"]["fusion"].choices) == tuple(FUSIONS)
    assert tuple(flags["predict"]["precision"].choices) == PRECISIONS and tuple(flags["label"]["tta"].choices) == TTAS
    with pytest.raises(OptionError, match="--head: unknown value 'sofmax' .did you mean 'softmax'"):
        TrainOptions(model="smp:Unet/resnet18", images="x", out="y", head="sofmax")


def _sections(text: str) -> dict[str, str]:
    """--help split at its section titles (unindented lines ending with a colon)."""
    sections, title = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            title = line[:-1]
            sections[title] = ""
        elif title:
            sections[title] += line + "\n"
    return sections


def test_train_help_is_grouped_by_purpose(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "usage: nakt train --model MODEL --images IMAGES --out OUT [options]"
    sections = _sections(text)
    titles = [GROUPS[k] for k in ("model", "data", "teachers", "schedule", "classification", "segmentation",
                                  "performance", "output")]
    assert list(sections) == ["options", *titles]  # argparse's own section holds only --help
    expected = {"model": "--model --task --init --normalization", "data": "--images --masks --val-images --cases",
                "teachers": "--teacher --teacher-mode --fusion --alpha", "schedule": "--epochs --lr --no-augment",
                "classification": "--labels --head --subsets", "segmentation": "--patch --hard-labels --orientation",
                "performance": "--precision --no-disk-cache --device", "output": "--out --resume --config"}
    for key, flags in expected.items():
        listed = {word for word in sections[GROUPS[key]].split() if word.startswith("--")}
        assert set(flags.split()) <= listed, key
    assert "(default: 50)" in sections[GROUPS["schedule"]] and "(required)" in sections[GROUPS["output"]]


def test_verbs_narrow_a_flag_s_help_and_distill_still_needs_a_teacher(capsys, tmp_path):
    assert main(["distill", "--help"]) == 0
    model = " ".join(_sections(capsys.readouterr().out)[GROUPS["model"]].split())
    assert "--model MODEL student model spec (required)" in model
    out = str(tmp_path / "o")
    assert main(["distill", "--model", "smp:Unet/resnet18", "--images", str(tmp_path), "--out", out]) == 2
    assert "nakt distill needs --teacher" in capsys.readouterr().err
    assert main(["report", "--device", "cpu"]) == 2  # report runs no network
    assert "unrecognized arguments: --device" in capsys.readouterr().err


def test_parsed_flags_are_the_option_values():
    args = build_parser().parse_args(["train", "--model", "m", "--teacher", "a", "--teacher", "b", "--size", "64",
                                      "48", "--no-augment", "--compile", "--lr", "0.01", "--epochs", "3"])
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("verb", "config")}
    assert values == {"model": "m", "teacher": ["a", "b"], "size": [64, 48], "augment": False, "compile": True,
                      "lr": 0.01, "epochs": 3}
    hints = typing.get_type_hints(TrainOptions)
    assert hints["size"] == list[int] | None and hints["augment"] is bool
    opts = TrainOptions(images="i", out="o", **values)
    assert opts.teacher == ["a", "b"] and opts.size == [64, 48] and not opts.augment


def test_train_sections_named_after_a_task_hold_only_that_task_s_options():
    from nakt.train import TASK_OPTIONS

    for task, names in TASK_OPTIONS.items():
        listed = {f.name for f in dataclasses.fields(TrainOptions)
                  if option_info(TrainOptions, f.name)["group"] == task}
        assert listed and listed <= set(names), task
