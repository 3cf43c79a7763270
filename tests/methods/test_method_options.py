"""Method options: typed models that validate, print and round-trip; ``Name(key=value, ...)`` wherever a method name
is accepted (API, CLI); the options recorded in the result and shown in the report."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, get_args

import pydantic
import pytest
import torch

import acps_core as acps
from acps_core.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from acps_core.errors import ArgumentError, PluginError
from acps_core.methods.bases import SensitivityBase
from acps_core.methods.hookspecs import hookimpl
from acps_core.methods.options import MethodOptions, MethodOptionsError, describe_method, options_model
from acps_core.methods.registry import Registry, format_plugins_table, get_registry, resolve_method
from acps_core.methods.spec import MethodSpecError, format_method_spec, parse_method_spec
from acps_core.report.documents import report_json, report_markdown

BUILT_IN = {
    "sensitivity": ["BalancedL2NormSensitivity", "FisherSensitivity", "GroupMagnitudeSensitivity",
                    "GroupTaylorSensitivity", "MeasuredSensitivity", "NormalizedTaylorSensitivity",
                    "OutputChangeSensitivity", "TaylorLossSensitivity"],
    "search": ["GlobalRankSearch", "GreedySearch", "KnapsackSearch"],
    "gain": ["AscendLatency", "BitComplexity", "MeasuredLatency"],
}
BUILT_IN_METHODS = [(kind, name) for kind, names in BUILT_IN.items() for name in names]
BUILT_IN_DISTRIBUTIONS = {"acps-sensitivity-methods", "acps-search-greedy", "acps-search-knapsack",
                          "acps-gain-estimators"}

# Every option of each method with a value other than its default, in the canonical form.
NON_DEFAULT_SPECS = [
    ("sensitivity", "TaylorLossSensitivity(seed=7, normalize='median')"),
    ("sensitivity", "NormalizedTaylorSensitivity(seed=1, normalize='none')"),
    ("sensitivity", "FisherSensitivity(seed=2, normalize='mean')"),
    ("sensitivity", "GroupTaylorSensitivity(seed=3, normalize='median', terms='all')"),
    ("sensitivity", "OutputChangeSensitivity(seed=5, normalize='mean')"),
    ("sensitivity", "MeasuredSensitivity(levels=2, max_samples=16)"),
    ("sensitivity", "GroupMagnitudeSensitivity(normalize='none')"),
    ("gain", "AscendLatency(chip='Ascend310', batch=8, fp16_tflops=7.5, int8_tops=None, bandwidth_gbs=900.0, "
             "overhead_us=0.0, vector_share=None, source='lab figures')"),
    ("gain", "MeasuredLatency(warmup=0, repeats=3, grid=[0.5, 1.0], batch=2, cache_dir=False, device='cpu', "
             "progress=False, measure_rest=False)"),
]


class PlainSensitivity(SensitivityBase):
    """A third-party method as written before options had models: keyword arguments checked by nobody."""

    def __init__(self, threshold: float = 0.5, label: str = "x") -> None:
        super().__init__()
        self.threshold = threshold
        self.label = label

    def get_sensitivity(self, search_records: list[Any]) -> None:
        for record in search_records:
            record.sensitivity = [self.threshold] * record.channels


class ModelledSensitivity(PlainSensitivity):
    """A third-party method with an Options model, registered under a name other than its class's."""

    class Options(MethodOptions):
        threshold: float = 0.5
        label: str = "x"

    def __init__(self, threshold: float = 0.5, label: str = "x") -> None:
        super().__init__(threshold, label)
        self.options = self.Options.checked(self, threshold=threshold, label=label)


class ThirdPartyPlugin:
    """An in-process plugin registering the two classes above."""

    __name__ = "third_party"

    @hookimpl
    def acps_register_sensitivities(self, register: Any) -> None:
        register("Plain", PlainSensitivity)
        register("Modelled.v2", ModelledSensitivity)


@pytest.fixture
def third_party() -> Registry:
    return Registry.build(extra_plugins=[ThirdPartyPlugin()], load_entrypoints=False)


def built(kind: str, spec: str) -> Any:
    return resolve_method(kind, spec, kind)


# --- every built-in method's options validate, print and round-trip -------------------------------------------


def test_every_built_in_method_declares_an_options_model() -> None:
    built_in = [(m.kind, m.name) for m in get_registry().methods() if m.distribution in BUILT_IN_DISTRIBUTIONS]

    assert sorted(built_in) == sorted(BUILT_IN_METHODS)
    for method in get_registry().methods():
        if method.distribution in BUILT_IN_DISTRIBUTIONS:
            assert options_model(method.cls) is not None, method.name


@pytest.mark.parametrize(("kind", "name"), BUILT_IN_METHODS)
def test_default_options_print_serialise_and_round_trip_through_their_spec(kind: str, name: str) -> None:
    method = built(kind, name)
    record = describe_method(method)

    assert (record.kind, record.name) == (kind, name)
    assert json.loads(json.dumps(record.options)) == record.options
    if record.options:
        assert record.spec == f"{name}({method.options})"
        assert isinstance(method.options, type(method).Options)
        assert repr(method.options).startswith(f"{type(method.options).__qualname__}(")
    else:
        assert record.spec == name  # a method without options is recorded by its bare name
    again = describe_method(built(kind, record.spec))
    assert again.spec == record.spec and again.options == record.options


@pytest.mark.parametrize(("kind", "spec"), NON_DEFAULT_SPECS)
def test_a_canonical_spec_builds_the_method_it_names_and_comes_back_unchanged(kind: str, spec: str) -> None:
    method = built(kind, spec)

    assert describe_method(method).spec == spec
    for name, value in parse_method_spec(spec).options.items():
        assert method.options.to_json()[name] == value


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k, n in BUILT_IN_METHODS])
def test_each_option_is_a_keyword_of_the_constructor(kind: str, name: str) -> None:
    cls = get_registry().get(kind, name).cls
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    model = options_model(cls)
    assert model is not None
    for option in model.model_fields:
        assert option in parameters or takes_any, f"{name}({option}=...) is not a constructor keyword"


def test_options_are_frozen_and_forbid_unknown_keys() -> None:
    method = built("sensitivity", "GroupTaylorSensitivity")

    with pytest.raises(pydantic.ValidationError):
        method.options.terms = "all"
    assert type(method).Options.model_config["extra"] == "forbid"


def test_normalize_means_the_same_in_every_sensitivity_method_that_takes_it() -> None:
    takers = [name for name in BUILT_IN["sensitivity"]
              if "normalize" in options_model(get_registry().get("sensitivity", name).cls).model_fields]

    assert set(takers) == {"TaylorLossSensitivity", "NormalizedTaylorSensitivity", "FisherSensitivity",
                           "GroupTaylorSensitivity", "OutputChangeSensitivity", "GroupMagnitudeSensitivity"}
    for name in takers:
        field = options_model(get_registry().get("sensitivity", name).cls).model_fields["normalize"]
        assert get_args(field.annotation) == ("none", "mean", "median"), name


def test_defaults_are_as_before() -> None:
    assert built("sensitivity", "TaylorLossSensitivity").options.to_json() == {"seed": 0, "normalize": "none"}
    assert built("sensitivity", "NormalizedTaylorSensitivity").options.normalize == "mean"
    assert built("sensitivity", "GroupTaylorSensitivity").options.to_json() == {
        "seed": 0, "normalize": "mean", "terms": "dense"}
    assert built("sensitivity", "GroupMagnitudeSensitivity").options.normalize == "median"
    assert built("sensitivity", "MeasuredSensitivity").options.to_json() == {"levels": 4, "max_samples": 128}
    assert built("gain", "MeasuredLatency").grid == (0.125, 0.25, 0.5, 0.75, 1.0)
    assert built("gain", "AscendLatency").chip.name == "Ascend910"


def test_the_old_bool_normalize_reads_as_the_unified_string() -> None:
    with pytest.warns(DeprecationWarning, match="normalize=True is deprecated; write normalize='mean'"):
        method = built("sensitivity", "TaylorLossSensitivity(normalize=True)")

    assert describe_method(method).spec == "TaylorLossSensitivity(seed=0, normalize='mean')"


# --- specs: read without eval, bare words, errors -------------------------------------------------------------


def test_a_spec_reads_literals_and_bare_words() -> None:
    spec = parse_method_spec("MeasuredLatency( grid = (0.5, 1.0) , cache_dir=False, device=cuda:0, "
                             "repeats=-3, label=\"a, b\", tag=None )")

    assert spec.name == "MeasuredLatency"
    assert dict(spec.options) == {"grid": (0.5, 1.0), "cache_dir": False, "device": "cuda:0", "repeats": -3,
                                  "label": "a, b", "tag": None}
    assert parse_method_spec(format_method_spec(spec.name, spec.options)) == spec
    assert parse_method_spec("GreedySearch") == parse_method_spec("GreedySearch()")


def test_informal_specs_are_recorded_in_the_canonical_form() -> None:
    method = built("sensitivity", "GroupTaylorSensitivity(terms=all)")

    assert method.terms == "all"
    assert describe_method(method).spec == "GroupTaylorSensitivity(seed=0, normalize='mean', terms='all')"


@pytest.mark.parametrize(("spec", "words"), [
    ("GroupTaylorSensitivity(terms='all'", "position 35: expected ',' between options or ')' after the last one"),
    ("GroupTaylorSensitivity(terms)", "position 29: expected '=' after the option name 'terms', found ')'"),
    ("GroupTaylorSensitivity(terms=all) extra", "position 35: unexpected text after ')'"),
    ("GroupTaylorSensitivity(terms=all))", "unexpected text after ')'"),
    ("GroupTaylorSensitivity(terms=all, terms=dense)", "position 35: option 'terms' is given twice"),
    ("GroupTaylorSensitivity(terms=)", "option 'terms' has no value"),
    ("GroupTaylorSensitivity(=all)", "expected an option name"),
    ("Group Taylor", "position 7: expected '(' before the options"),
    ("(terms=all)", "position 1: expected a method name"),
    ("GroupTaylorSensitivity(terms=a b)", "'a b' is neither a Python literal nor a bare word (quote it)"),
    ("GroupTaylorSensitivity(terms={'a': 1})", "the value of 'terms' is a dict"),
    ("GroupTaylorSensitivity(terms=[1, 2)", "unbalanced ')' in the value of 'terms'"),
    ("GroupTaylorSensitivity(terms='all)", "the value of 'terms' is not closed"),
    ("GroupTaylorSensitivity(seed=__import__('os').getpid())", "is neither a Python literal nor a bare word"),
])
def test_a_malformed_spec_is_refused_with_the_position_and_the_form(spec: str, words: str) -> None:
    with pytest.raises(MethodSpecError) as caught:
        resolve_method("sensitivity", spec, "sensitivity")

    message = str(caught.value)
    assert isinstance(caught.value, ArgumentError)
    assert message.startswith("sensitivity: malformed method spec at position ")
    assert words in message
    assert f"\n    {spec}\n" in message  # the spec, with a caret under the position
    assert "Name(option=value, ...)" in message


def test_an_overlong_spec_is_refused_before_it_is_read() -> None:
    with pytest.raises(MethodSpecError, match="characters long"):
        parse_method_spec("GreedySearch(" + "a=1, " * 1000 + ")")


@pytest.mark.parametrize(("spec", "words"), [
    ("GroupTaylorSensitivity(term=all)", "GroupTaylorSensitivity: unknown option 'term' (did you mean 'terms'?)"),
    ("GroupTaylorSensitivity(term=all)", "GroupTaylorSensitivity takes seed: int = 0, normalize: 'none' | 'mean' | "
                                         "'median' = 'mean', terms: 'all' | 'dense' = 'dense'"),
    ("GroupMagnitudeSensitivity(normalize=max)", "normalize must be 'none', 'mean' or 'median', got 'max'"),
    ("MeasuredSensitivity(levels=four)", "levels='four' is invalid: input should be a valid integer"),
    ("MeasuredSensitivity(max_samples=0)", "max_samples=0 is invalid: input should be greater than or equal to 1"),
    ("MeasuredSensitivity(max_samples=0)", "max_samples: int (>= 1) = 128"),
    ("TaylorLossSensitivity(seed=True)", "seed=True is invalid: expected int, got True"),
    ("TaylorLossSensitivity(seed=1.5)", "seed=1.5 is invalid"),
])
def test_a_bad_option_is_refused_naming_the_method_the_option_and_what_it_takes(spec: str, words: str) -> None:
    with pytest.raises(MethodOptionsError) as caught:
        resolve_method("sensitivity", spec, "sensitivity")

    assert isinstance(caught.value, ArgumentError)
    assert words in str(caught.value)


def test_options_of_other_methods_are_checked_too() -> None:
    with pytest.raises(MethodOptionsError, match=r"GreedySearch: unknown option 'steps'\. GreedySearch takes no "
                                                 r"options"):
        resolve_method("search", "GreedySearch(steps=3)", "search_alg")
    with pytest.raises(MethodOptionsError, match="unknown Ascend chip 'Ascend999'"):
        resolve_method("gain", "AscendLatency(chip=Ascend999)", "gain")
    with pytest.raises(MethodOptionsError, match=r"grid\[1\]='x' is invalid"):
        resolve_method("gain", "MeasuredLatency(grid=(0.5, 'x'))", "gain")
    with pytest.raises(MethodOptionsError, match="grid shares must be in"):
        resolve_method("gain", "MeasuredLatency(grid=(0, 1))", "gain")
    with pytest.raises(MethodOptionsError, match="torch does not know the device 'gpu7'"):
        resolve_method("gain", "MeasuredLatency(device=gpu7)", "gain")


def test_a_chip_of_ones_own_needs_every_figure_and_round_trips() -> None:
    from acps_gain_ascend import AscendLatency, Chip

    mine = AscendLatency(Chip("Lab", fp16_tflops=1.0, int8_tops=2.0, bandwidth_gbs=3.0, overhead_us=4.0))
    spec = describe_method(mine).spec

    assert spec.startswith("AscendLatency(chip='Lab', batch=1, fp16_tflops=1.0, int8_tops=2.0")
    assert built("gain", spec).chip == mine.chip
    with pytest.raises(MethodOptionsError, match="for a chip of your own, also give int8_tops"):
        built("gain", "AscendLatency(chip=Lab, fp16_tflops=1)")


# --- third-party methods --------------------------------------------------------------------------------------


def test_a_class_without_an_options_model_gets_the_keywords_of_its_spec(third_party: Registry) -> None:
    method = resolve_method("sensitivity", "Plain(threshold=0.25, label=abc)", "sensitivity", registry=third_party)

    assert isinstance(method, PlainSensitivity) and (method.threshold, method.label) == (0.25, "abc")
    record = describe_method(method)
    assert record.options == {"threshold": 0.25, "label": "abc"}
    assert record.spec == "Plain(threshold=0.25, label='abc')"
    assert describe_method(resolve_method("sensitivity", "Plain", "sensitivity", registry=third_party)).spec == \
        "Plain"


def test_a_class_without_an_options_model_built_by_the_caller_has_unknown_options() -> None:
    record = describe_method(PlainSensitivity(threshold=0.1))

    assert record.options is None and record.spec == "PlainSensitivity"


def test_a_bad_keyword_for_a_class_without_a_model_names_the_class_and_the_plugin(third_party: Registry) -> None:
    with pytest.raises(PluginError, match=r"'Plain\(treshold=0.25\)'.*plugin 'third_party' \(in-process\).*"
                                          r"treshold.*declares no Options model"):
        resolve_method("sensitivity", "Plain(treshold=0.25)", "sensitivity", registry=third_party)


def test_a_third_party_model_is_checked_and_recorded_by_its_registered_name(third_party: Registry) -> None:
    method = resolve_method("sensitivity", "Modelled.v2(threshold=2)", "sensitivity", registry=third_party)

    assert method.threshold == 2.0
    assert describe_method(method).spec == "Modelled.v2(threshold=2.0, label='x')"
    with pytest.raises(MethodOptionsError, match=r"Modelled\.v2: unknown option 'treshold' \(did you mean "
                                                 r"'threshold'\?\)"):
        resolve_method("sensitivity", "Modelled.v2(treshold=2)", "sensitivity", registry=third_party)


def test_describe_method_refuses_what_is_not_a_method() -> None:
    with pytest.raises(ArgumentError, match="is not an acps method"):
        describe_method(object())


# --- the API and the CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def calibration(tmp_path: Path) -> tuple[list[torch.Tensor], Path]:
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)]
    torch.save(data, tmp_path / "calib.pt")
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    return data, tmp_path


def test_the_public_call_takes_a_spec_as_it_takes_an_instance(calibration: tuple[list[torch.Tensor], Path]) -> None:
    from acps_sensitivity_taylor import GroupMagnitudeSensitivity
    from tests.support.cli_models import small_cnn

    data, folder = calibration
    by_spec = acps.auto_channel_prune_search(small_cnn().eval(), folder / "search.cfg", data, folder / "a.cfg",
                                             sensitivity="GroupMagnitudeSensitivity(normalize=mean)",
                                             search_alg="GlobalRankSearch()", gain="BitComplexity()")
    by_object = acps.auto_channel_prune_search(small_cnn().eval(), folder / "search.cfg", data, folder / "b.cfg",
                                               sensitivity=GroupMagnitudeSensitivity(normalize="mean"),
                                               search_alg="GlobalRankSearch", gain="BitComplexity")

    assert by_spec.kept_channels == by_object.kept_channels and by_spec.cost_unit == "bit-ops"


def test_acps_search_takes_specs_for_every_method(calibration: tuple[list[torch.Tensor], Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = calibration
    assert main(["search", "--model", "tests.support.cli_models:small_cnn", "--data", str(folder / "calib.pt"),
                 "--config", str(folder / "search.cfg"), "--output", str(folder / "prune.cfg"),
                 "--sensitivity", "GroupTaylorSensitivity(terms=all, normalize=median)",
                 "--search", "GlobalRankSearch()", "--gain", "AscendLatency(chip=Ascend310, batch=2)",
                 "--quiet"]) == EXIT_OK

    report = json.loads((folder / "prune.cfg.report.json").read_text())
    assert report["totals"]["cost_unit"] == "us (Ascend model)"
    assert report["methods"]["sensitivity"].startswith("GroupTaylorSensitivity")


def test_acps_search_checks_the_options_before_building_the_model(calibration: tuple[list[torch.Tensor], Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = calibration
    # The factory does not exist: the options are refused first, so that is not the error shown.
    assert main(["search", "--model", "tests.support.cli_models:no_such_factory", "--data", str(folder / "calib.pt"),
                 "--config", str(folder / "search.cfg"), "--output", str(folder / "prune.cfg"),
                 "--sensitivity", "GroupMagnitudeSensitivity(normalise=mean)"]) == EXIT_BAD_INPUT

    error = capsys.readouterr().err
    assert "GroupMagnitudeSensitivity: unknown option 'normalise' (did you mean 'normalize'?)" in error
    assert "no_such_factory" not in error
    assert not (folder / "prune.cfg").exists()


def test_acps_search_names_the_option_of_a_malformed_spec(calibration: tuple[list[torch.Tensor], Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _, folder = calibration
    assert main(["search", "--model", "tests.support.cli_models:small_cnn", "--data", str(folder / "calib.pt"),
                 "--config", str(folder / "search.cfg"), "--output", str(folder / "prune.cfg"),
                 "--gain", "AscendLatency(chip=Ascend310"]) == EXIT_BAD_INPUT

    assert "acps: error: --gain: malformed method spec at position 29" in capsys.readouterr().err


def test_acps_plugins_lists_each_methods_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == EXIT_OK

    out = capsys.readouterr().out
    options = out.split("Options (select a method with options as Name(option=value, ...)):\n", 1)[1]
    assert ("  GroupTaylorSensitivity(seed: int = 0, normalize: 'none' | 'mean' | 'median' = 'mean', terms: "
            "'all' | 'dense' = 'dense')") in options
    assert "  MeasuredSensitivity(levels: int (>= 1) = 4, max_samples: int (>= 1) = 128)" in options
    assert "GreedySearch" not in options  # it takes none
    assert format_plugins_table(get_registry()) == out


# --- the options in the result and the report -------------------------------------------------------------------


def result_of(*methods: object) -> acps.SearchResult:
    """A result whose methods are recorded as the search records them (see describe_method)."""
    records = [describe_method(method) for method in methods]
    return acps.SearchResult(
        layers={}, cost_before=100.0, cost_after=60.0, cost_unit="us (Ascend model)", compress_ratio=1.5,
        target_reached=True, methods={r.kind: r.spec for r in records},
        method_options={r.kind: r.options for r in records})


def test_the_markdown_report_shows_each_methods_options() -> None:
    result = result_of(built("sensitivity", "GroupTaylorSensitivity(terms=all)"), built("search", "GreedySearch"),
                       built("gain", "AscendLatency(chip=Ascend310, source='a|b')"))

    markdown = report_markdown(result)
    summary, rest = markdown.split("## Methods\n", 1)
    section = rest.split("## ", 1)[0]
    assert "Methods: sensitivity GroupTaylorSensitivity, search GreedySearch, gain AscendLatency." in summary
    assert "| sensitivity | GroupTaylorSensitivity | `seed=0, normalize='mean', terms='all'` |" in section
    assert "| search | GreedySearch | - |" in section
    assert "| gain | AscendLatency | `chip='Ascend310', batch=1, " in section and "source='a\\|b'` |" in section


def test_the_json_report_records_the_specs_and_the_configuration_the_options() -> None:
    result = result_of(built("sensitivity", "MeasuredSensitivity(levels=2)"), built("search", "KnapsackSearch"),
                       built("gain", "BitComplexity"))
    settings = {"compress_ratio": 1.5, "methods": dict(result.methods), "method_options": result.method_options}

    report = json.loads(report_json(result, settings))
    assert report["methods"] == result.methods
    assert report["methods"]["sensitivity"] == "MeasuredSensitivity(levels=2, max_samples=128)"
    assert report["configuration"]["method_options"] == {
        "sensitivity": {"levels": 2, "max_samples": 128}, "search": {}, "gain": {}}
    spec = report["methods"]["sensitivity"]
    assert describe_method(resolve_method("sensitivity", spec, "sensitivity")).spec == spec  # selects it again


def test_a_method_recorded_by_a_plain_name_shows_no_options() -> None:
    result = result_of(PlainSensitivity(), built("search", "GreedySearch"), built("gain", "BitComplexity"))
    result.methods["sensitivity"] = "hand written (v2)"

    section = report_markdown(result).split("## Methods\n", 1)[1].split("## ", 1)[0]
    assert "| sensitivity | hand written (v2) | - |" in section
    assert result.method_options["sensitivity"] is None
