"""options.py and ptft.py's parsers as a specification: each setting is declared once, as a field,
and its flag, help, default and minimum all follow from that one declaration."""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, replace

import pytest

import options
import ptft
from common import InputError
from options import BenchOptions, DistillOptions, FinetuneOptions, PretrainOptions, PruneOptions

# the commands whose flags are an options dataclass's fields (ptft.add_options, ptft.options_from)
OPTIONS_OF_COMMAND = {"demo": options.DemoOptions, "pretrain": PretrainOptions,
                      "finetune": FinetuneOptions, "distill": DistillOptions, "prune": PruneOptions,
                      "bench": BenchOptions, "tokenize": options.TokenizeOptions}
# what each command needs on its command line besides its options (a later flag wins in argparse)
REQUIRED = {"demo": [], "pretrain": ["--out", "o"], "bench": [],
            "finetune": ["--init", "scratch", "--train", "t.tsv", "--out", "o"],
            "distill": ["--teacher", "ft", "--train", "t.tsv", "--out", "o"],
            "prune": ["--init", "ft", "--out", "o"],
            "tokenize": ["--corpus", "c.txt", "--out", "o"]}
RUN_FLAGS = {"out", "resume", "force", "help"}  # where a run goes, not how it computes


def command_parsers():
    """Each command's argparse parser, by name."""
    return next(a for a in ptft.build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def settings(options_class, group=()):
    """(group, field) for every setting of options_class, the grouped ones too (remedies)."""
    for f in dataclasses.fields(options_class):
        if dataclasses.is_dataclass(f.type):
            yield from settings(f.type, (*group, f.name))
        else:
            yield group, f


def reached(found, group, name):
    for part in group:
        found = getattr(found, part)
    return getattr(found, name)


def typed(f):
    """A value unlike any default for the field, and the words that type it after its flag."""
    if f.type is bool:
        return not f.default, []
    kind = (typing.get_args(f.type) or (f.type,))[0]
    value = {int: 7919, float: 0.4375, str: "chosen"}[kind]
    if typing.get_origin(f.type) in (list, tuple):
        return [value, value], [str(value), str(value)]
    return value, [str(value)]


def test_every_flag_reaches_its_field_and_only_fields_the_code_sets_have_no_flag():
    # a flag whose dest named no field would be parsed, then silently ignored (options_from goes
    # by field name); a field without a flag could not be chosen from the command line
    commands = command_parsers()
    code_sets = {"pretrain": {"lowercase"}, "finetune": {"mlm_max_length", "vocab_size"}}
    for name, options_class in OPTIONS_OF_COMMAND.items():
        parser = commands[name]
        flagged = {f.name for _, f in settings(options_class) if f.metadata["command_line"]}
        assert {action.dest for action in parser._actions} - RUN_FLAGS == flagged, name
        unflagged = {f.name for _, f in settings(options_class)} - flagged
        assert unflagged == code_sets.get(name, set()), name
        defaults = ptft.options_from(options_class, parser.parse_args(REQUIRED[name]))
        for group, f in settings(options_class):
            if f.name in flagged:
                value, words = typed(f)
                args = parser.parse_args([*REQUIRED[name], options.flag_of(f), *words])
                assert reached(ptft.options_from(options_class, args), group, f.name) == value
            if options.flag_of(f) not in REQUIRED[name]:  # the default is the field's own
                assert reached(defaults, group, f.name) == reached(options_class(), group, f.name)


def test_every_minimum_a_flag_has_is_exactly_where_refusal_starts():
    # each declared least: least - 1 is refused in one line naming the flag, least itself passes
    required = {"prune": {"train": "train.tsv"}}  # what check() asks for besides numbers
    # the minima themselves: a step, a sequence, a row; 8 tokens hold [CLS] A [SEP] B [SEP] with
    # room; 0 means "none"
    minima = {"demo": {"--seeds": 1, "--labels-per-class": 1, "--pretrain-steps": 1, "--epochs": 1},
              "pretrain": {"--steps": 1, "--batch-size": 1, "--accum": 1, "--max-length": 8,
                           "--warmup-steps": 0, "--clip-norm": 0, "--save-every": 0, "--eval-every": 1,
                           "--vocab-size": 8, "--collective-timeout": 1},
              "finetune": {"--epochs": 1, "--batch-size": 1, "--max-length": 8, "--vocab-size": 8,
                           "--adapt-steps": 0, "--collective-timeout": 1},
              "distill": {"--epochs": 1, "--batch-size": 1, "--max-unlabeled": 0},
              "prune": {"--epochs": 0, "--batch-size": 1},
              "bench": {"--steps": 1, "--batch-size": 1, "--vocab-size": 8},
              "tokenize": {"--vocab-size": 8, "--workers": 1}}
    checked = 0
    for name, options_class in OPTIONS_OF_COMMAND.items():
        assert options.minima(options_class) == minima[name], name
        base = replace(options_class(), **required.get(name, {}))
        base.check()
        for _, f in settings(options_class):
            if f.metadata.get("least") is None:
                continue
            flag, least = options.flag_of(f), f.metadata["least"]
            refusal = f"^{flag} must be at least {least}, got {least - 1}$"
            with pytest.raises(InputError, match=refusal):
                replace(base, **{f.name: least - 1}).check()
            try:
                replace(base, **{f.name: least}).check()
            except InputError as error:
                assert f"{flag} must be at least" not in str(error)
            checked += 1
    assert checked == sum(map(len, minima.values()))


def test_a_value_outside_a_fields_choices_is_refused_naming_the_flag_and_the_choices():
    cases = [(FinetuneOptions(pool="max"), "--pool: expected cls or mean, got 'max'"),
             (FinetuneOptions(schedule="linear"), "--schedule: expected cosine, constant or cyclical"),
             (PruneOptions(unit="layers", train="t.tsv"), "--unit: expected weights, ffn-units or heads"),
             (BenchOptions(precision="fp16"),
              "--precision: expected auto, fp32 or bf16, got 'fp16'"),
             (DistillOptions(student_config="huge"),
              "--student-config: expected tiny, small or base, got 'huge'")]
    for chosen, message in cases:
        with pytest.raises(InputError) as error:
            chosen.check()
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_adding_a_setting_is_one_field_its_flag_help_default_and_bounds_follow():
    # docs/runs.md, "Adding a setting": the field below is all a new setting needs
    @dataclass
    class Options:
        label_smoothing: float = options.setting(0.0, "epsilon of label smoothing", flag="--smooth")
        patience: int = options.setting(3, "epochs without improvement before stopping", least=1)
        shuffle: bool = options.setting(True, "keep the data's order", flag="--no-shuffle")

    parser = argparse.ArgumentParser(formatter_class=ptft.HelpFormatter)
    ptft.add_options(parser, Options)
    shown = " ".join(parser.format_help().split())
    assert "--smooth LABEL_SMOOTHING epsilon of label smoothing (default: 0.0)" in shown
    assert "--patience PATIENCE epochs without improvement before stopping (default: 3)" in shown
    assert "--no-shuffle keep the data's order" in shown
    assert ptft.options_from(Options, parser.parse_args([])) == Options()
    assert (ptft.options_from(Options, parser.parse_args(["--smooth", "0.1", "--no-shuffle"]))
            == Options(label_smoothing=0.1, shuffle=False))
    with pytest.raises(InputError, match="^--patience must be at least 1, got 0$"):
        options.check_settings(Options(patience=0))
    options.check_settings(Options(patience=1))


def test_the_masking_rule_is_written_once_in_data():
    # the options' B1 numbers are data.MaskingRule's (15%, 80/10/10), not copies of them
    assert PretrainOptions().masking_rule() == options.MaskingRule()
