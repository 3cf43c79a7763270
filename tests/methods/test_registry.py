"""The plugin registry: discovery, attribution, validation, conflicts and method resolution.

Unit tests use a clean plugin manager with in-process plugins; the entry-point tests install real throwaway
distributions with pip (see tests/support/plugin_factory.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from acps_core.errors import PluginError
from acps_core.methods import registry as registry_module
from acps_core.methods.bases import GainEstimatorBase, MethodDefinitionError, SearchChannelBase, SensitivityBase
from acps_core.methods.hookspecs import hookimpl
from acps_core.methods.registry import (
    IN_PROCESS,
    AcpsPluginWarning,
    MethodArgumentError,
    Registry,
    format_plugins_table,
    get_plugin_manager,
    get_registry,
    register_plugin,
    resolve_method,
    unregister_plugin,
)
from tests.support.plugin_factory import PluginInstaller


class ZeroSensitivity(SensitivityBase):
    """Scores every channel 0."""

    def get_sensitivity(self, search_records: list[Any]) -> None:
        for record in search_records:
            record.sensitivity = [0.0] * record.channels


class OtherSensitivity(SensitivityBase):
    """A second sensitivity class, to clash with ZeroSensitivity's name."""

    def get_sensitivity(self, search_records: list[Any]) -> None:
        for record in search_records:
            record.sensitivity = [1.0] * record.channels


class KeepAllSearch(SearchChannelBase):
    """Keeps every channel."""

    def channel_prune_search(self, graph_info: Any, search_records: list[Any], prune_config: Any) -> dict:
        return {}


class ProductGain(GainEstimatorBase):
    """Cost = in x out channels."""

    def layer_cost(self, layer: Any, in_channels: int, out_channels: int) -> float:
        return float(in_channels * out_channels)


class NotAMethod:
    """A class that subclasses no base."""


class NeedsArguments(SensitivityBase):
    """Cannot be built with no arguments."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def get_sensitivity(self, search_records: list[Any]) -> None:
        """Unused."""


class ReferenceShapedSensitivity(SensitivityBase):
    """Written against the reference's interface: only get_sensitivity, nothing acps-specific."""

    def get_sensitivity(self, search_records):  # deliberately untyped, as in the reference
        for record in search_records:
            record.sensitivity = [1.0] * record.channels


class MisspeltSensitivity(SensitivityBase):
    """Implements get_sensitivities instead of get_sensitivity."""

    def get_sensitivities(self, search_records: list[Any]) -> None:
        """Never called: the name is wrong."""


class StaticPlugin:
    """An in-process plugin that registers fixed (name, class) pairs for each kind."""

    def __init__(self, name: str, sensitivity: tuple[tuple[Any, Any], ...] = (),
                 search: tuple[tuple[Any, Any], ...] = (), gain: tuple[tuple[Any, Any], ...] = ()) -> None:
        self.__name__ = name
        self.entries = {"sensitivity": sensitivity, "search": search, "gain": gain}

    @hookimpl
    def acps_register_sensitivities(self, register: Any) -> None:
        for name, cls in self.entries["sensitivity"]:
            register(name, cls)

    @hookimpl
    def acps_register_search_algorithms(self, register: Any) -> None:
        for name, cls in self.entries["search"]:
            register(name, cls)

    @hookimpl
    def acps_register_gain_estimators(self, register: Any) -> None:
        for name, cls in self.entries["gain"]:
            register(name, cls)


def build(*plugins: object) -> Registry:
    """A registry of only these in-process plugins."""
    return Registry.build(extra_plugins=plugins, load_entrypoints=False)


def build_expecting_warning(*plugins: object) -> Registry:
    """Like build(), asserting an AcpsPluginWarning is issued."""
    with pytest.warns(AcpsPluginWarning):
        return build(*plugins)


@pytest.fixture
def installer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginInstaller]:
    """Installs throwaway plugin distributions for the test; the registry cache starts empty."""
    with PluginInstaller(tmp_path, monkeypatch) as plugin_installer:
        yield plugin_installer


@pytest.fixture
def fresh_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empties the module-level registry cache for the test and restores it afterwards."""
    monkeypatch.setattr(registry_module, "_default_manager", None)
    monkeypatch.setattr(registry_module, "_default_registry", None)


# --- registration from in-process plugins -------------------------------------------------------------------


def test_in_process_plugin_methods_are_attributed_to_the_plugin() -> None:
    registry = build(StaticPlugin("mine", sensitivity=(("Zero", ZeroSensitivity),)))

    method = registry.get("sensitivity", "Zero")

    assert method.cls is ZeroSensitivity
    assert (method.kind, method.plugin, method.distribution, method.version) == ("sensitivity", "mine",
                                                                                  IN_PROCESS, None)


def test_methods_are_sorted_by_kind_then_name_and_filtered_by_kind() -> None:
    registry = build(StaticPlugin("p", sensitivity=(("b", ZeroSensitivity), ("a", OtherSensitivity)),
                                  search=(("KeepAll", KeepAllSearch),), gain=(("Product", ProductGain),)))

    assert [(m.kind, m.name) for m in registry.methods()] == [
        ("sensitivity", "a"), ("sensitivity", "b"), ("search", "KeepAll"), ("gain", "Product")]
    assert [m.name for m in registry.methods("search")] == ["KeepAll"]


def test_clean_plugin_manager_has_no_plugins() -> None:
    assert Registry.from_plugin_manager(get_plugin_manager(load_entrypoints=False)).methods() == []


def test_unknown_name_lists_installed_names_of_that_kind() -> None:
    registry = build(StaticPlugin("p", sensitivity=(("Zero", ZeroSensitivity), ("Other", OtherSensitivity)),
                                  search=(("KeepAll", KeepAllSearch),)))

    with pytest.raises(PluginError, match="no sensitivity method named 'Missing'") as caught:
        registry.get("sensitivity", "Missing")

    assert "Installed sensitivity methods: Other, Zero" in str(caught.value)
    assert "KeepAll" not in str(caught.value)


def test_unknown_name_suggests_a_close_match() -> None:
    registry = build(StaticPlugin("p", sensitivity=(("ZeroSensitivity", ZeroSensitivity),)))

    with pytest.raises(PluginError, match="Did you mean 'ZeroSensitivity'"):
        registry.get("sensitivity", "ZeroSensitivty")


def test_unknown_name_mentions_plugins_that_failed_to_load() -> None:
    registry = build_expecting_warning(StaticPlugin("ok", sensitivity=(("Zero", ZeroSensitivity),)),
                                       StaticPlugin("bad", sensitivity=(("Broken", NotAMethod),)))

    with pytest.raises(PluginError, match=r"failed to load.*'bad'.*not a subclass"):
        registry.get("sensitivity", "Broken")


def test_unknown_kind_is_an_error_listing_the_kinds() -> None:
    with pytest.raises(PluginError, match="sensitivity, search, gain"):
        build().get("pruner", "x")


def test_non_subclass_fails_the_plugin_and_names_the_expected_base() -> None:
    plugin = StaticPlugin("bad", sensitivity=(("Good", ZeroSensitivity),), search=(("Wrong", NotAMethod),))

    registry = build_expecting_warning(plugin)

    [failure] = registry.failures
    assert failure.plugin == "bad" and failure.distribution == IN_PROCESS and not failure.disabled
    assert "NotAMethod" in failure.reason
    assert "acps_core.SearchChannelBase" in failure.reason
    # All or nothing: the plugin's valid method is not half-registered.
    assert registry.methods() == []


def test_registering_an_instance_instead_of_a_class_fails_the_plugin() -> None:
    registry = build_expecting_warning(StaticPlugin("bad", sensitivity=(("Zero", ZeroSensitivity()),)))

    assert "register the class itself" in registry.failures[0].reason


@pytest.mark.parametrize("bad_name", ["", "has space", "9starts_with_digit", 42])
def test_invalid_method_names_fail_the_plugin(bad_name: object) -> None:
    registry = build_expecting_warning(StaticPlugin("bad", sensitivity=((bad_name, ZeroSensitivity),)))

    assert "method name must be" in registry.failures[0].reason


def test_a_plugin_whose_hook_raises_is_skipped_and_others_still_register() -> None:
    class Raising:
        __name__ = "raising"

        @hookimpl
        def acps_register_sensitivities(self, register: Any) -> None:
            raise RuntimeError("optional dependency missing")

    with pytest.warns(AcpsPluginWarning, match="optional dependency missing"):
        registry = build(Raising(), StaticPlugin("ok", sensitivity=(("Zero", ZeroSensitivity),)))

    assert [m.name for m in registry.methods()] == ["Zero"]
    assert registry.failures[0].plugin == "raising"


def test_a_misspelt_hook_name_is_reported_with_the_right_name() -> None:
    class Misspelt:
        __name__ = "misspelt"

        @hookimpl
        def acps_register_sensitivity(self, register: Any) -> None:
            register("Zero", ZeroSensitivity)

    registry = build_expecting_warning(Misspelt())

    assert "rename it to acps_register_sensitivities" in registry.failures[0].reason


def test_two_plugins_registering_one_name_is_an_error_naming_both() -> None:
    with pytest.raises(PluginError) as caught:
        build(StaticPlugin("first", sensitivity=(("Dup", ZeroSensitivity),)),
              StaticPlugin("second", sensitivity=(("Dup", OtherSensitivity),)))

    message = str(caught.value)
    assert "'Dup'" in message and "sensitivity" in message
    assert "'first'" in message and "'second'" in message
    assert "ZeroSensitivity" in message and "OtherSensitivity" in message
    assert "ACPS_DISABLE_PLUGINS" in message


def test_one_name_in_two_kinds_is_not_a_conflict() -> None:
    registry = build(StaticPlugin("a", sensitivity=(("Same", ZeroSensitivity),)),
                     StaticPlugin("b", search=(("Same", KeepAllSearch),)))

    assert registry.get("search", "Same").cls is KeepAllSearch


# --- the module-level registry and in-process registration --------------------------------------------------


def test_register_plugin_makes_a_method_selectable_by_name(fresh_default_registry: None) -> None:
    plugin_name = register_plugin(StaticPlugin("mine", sensitivity=(("InProcZero", ZeroSensitivity),)))

    assert get_registry().get("sensitivity", "InProcZero").distribution == IN_PROCESS
    assert isinstance(resolve_method("sensitivity", "InProcZero", "sensitivity"), ZeroSensitivity)

    unregister_plugin(plugin_name)
    with pytest.raises(PluginError):
        get_registry().get("sensitivity", "InProcZero")


def test_register_plugin_rejects_an_invalid_plugin_and_leaves_the_registry_intact(
        fresh_default_registry: None) -> None:
    before = get_registry().methods()

    with pytest.raises(PluginError, match=r"acps_core\.SensitivityBase"):
        register_plugin(StaticPlugin("bad", sensitivity=(("Bad", NotAMethod),)))

    assert get_registry().methods() == before


def test_register_plugin_rejects_a_conflicting_name(fresh_default_registry: None) -> None:
    first = register_plugin(StaticPlugin("first", sensitivity=(("InProcDup", ZeroSensitivity),)))

    with pytest.raises(PluginError, match="'InProcDup' is registered twice"):
        register_plugin(StaticPlugin("second", sensitivity=(("InProcDup", OtherSensitivity),)))

    assert get_registry().get("sensitivity", "InProcDup").plugin == first


# --- resolve_method -----------------------------------------------------------------------------------------


@pytest.fixture
def small_registry() -> Registry:
    return build(StaticPlugin("p", sensitivity=(("Zero", ZeroSensitivity), ("NeedsArgs", NeedsArguments),
                                                ("Misspelt", MisspeltSensitivity)),
                              search=(("KeepAll", KeepAllSearch),)))


def test_resolve_name_instantiates_the_registered_class(small_registry: Registry) -> None:
    method = resolve_method("sensitivity", "Zero", "sensitivity", registry=small_registry)

    assert type(method) is ZeroSensitivity


def test_resolve_instance_is_returned_as_is(small_registry: Registry) -> None:
    mine = OtherSensitivity()

    assert resolve_method("sensitivity", mine, "sensitivity", registry=small_registry) is mine


def test_resolve_class_asks_for_an_instance(small_registry: Registry) -> None:
    with pytest.raises(MethodArgumentError, match=r"pass an instance.*sensitivity=OtherSensitivity\(\)"):
        resolve_method("sensitivity", OtherSensitivity, "sensitivity", registry=small_registry)


def test_resolve_wrong_type_names_parameter_type_and_choices(small_registry: Registry) -> None:
    with pytest.raises(TypeError) as caught:
        resolve_method("search", 3, "search_alg", registry=small_registry)

    message = str(caught.value)
    assert isinstance(caught.value, MethodArgumentError)
    assert "search_alg=" in message and "int" in message
    assert "'KeepAll'" in message and "acps_core.SearchChannelBase" in message


def test_resolve_method_of_another_kind_says_where_it_belongs(small_registry: Registry) -> None:
    with pytest.raises(MethodArgumentError, match="pass it as search_alg="):
        resolve_method("sensitivity", KeepAllSearch(), "sensitivity", registry=small_registry)


def test_resolve_unknown_name_lists_installed_names(small_registry: Registry) -> None:
    with pytest.raises(PluginError, match="Installed search methods: KeepAll"):
        resolve_method("search", "Nope", "search_alg", registry=small_registry)


def test_resolve_wraps_constructor_errors_naming_method_and_plugin(small_registry: Registry) -> None:
    with pytest.raises(PluginError, match=r"'NeedsArgs'.*plugin 'p' \(in-process\).*threshold"):
        resolve_method("sensitivity", "NeedsArgs", "sensitivity", registry=small_registry)


# --- user classes written against the reference's interface -------------------------------------------------


def test_a_reference_shaped_sensitivity_class_is_accepted(small_registry: Registry) -> None:
    model = torch.nn.Linear(2, 2)
    method = ReferenceShapedSensitivity()
    # The reference's positional call shape; the graph object is irrelevant to this class.
    method.setup_initialization((model, cast(Any, "graph")), [torch.ones(1, 2), torch.ones(1, 2)], 1)

    assert resolve_method("sensitivity", method, "sensitivity", registry=small_registry) is method
    assert method.model is model and method.test_iteration == 1


def test_a_misspelt_required_method_tells_to_rename_it() -> None:
    with pytest.raises(MethodDefinitionError, match=r"rename get_sensitivities\(\) to get_sensitivity\(\)"):
        MisspeltSensitivity()  # type: ignore[abstract]  # the misspelling is what is tested


def test_a_misspelt_registered_class_fails_by_name_with_the_rename_hint(small_registry: Registry) -> None:
    with pytest.raises(PluginError, match=r"'Misspelt'.*rename get_sensitivities\(\) to get_sensitivity\(\)"):
        resolve_method("sensitivity", "Misspelt", "sensitivity", registry=small_registry)


# --- format_plugins_table -----------------------------------------------------------------------------------


def test_plugins_table_lists_methods_and_failed_plugins() -> None:
    registry = build_expecting_warning(StaticPlugin("good", sensitivity=(("Zero", ZeroSensitivity),),
                                                    gain=(("Product", ProductGain),)),
                                       StaticPlugin("bad", search=(("Wrong", NotAMethod),)))

    table = format_plugins_table(registry)
    rows = table.splitlines()

    assert rows[0].split() == ["kind", "name", "class", "distribution", "version"]
    zero_row = next(row for row in rows if " Zero " in row)
    assert zero_row.split()[0] == "sensitivity"
    assert f"{ZeroSensitivity.__module__}:ZeroSensitivity" in zero_row
    assert IN_PROCESS in zero_row
    assert any(row.split()[:2] == ["gain", "Product"] for row in rows)
    assert "Plugins not loaded:" in table
    failed_row = next(row for row in rows if row.strip().startswith("bad "))
    assert "failed" in failed_row and "acps_core.SearchChannelBase" in failed_row


def test_plugins_table_says_when_nothing_is_installed() -> None:
    assert "No acps methods are installed." in format_plugins_table(build())


# --- entry points of real installed distributions -----------------------------------------------------------

SENSITIVITY_PLUGIN = """
    from acps_core.methods.bases import SensitivityBase
    from acps_core.methods.hookspecs import hookimpl


    class {cls}(SensitivityBase):
        def get_sensitivity(self, search_records):
            for record in search_records:
                record.sensitivity = [1.0] * record.channels


    @hookimpl
    def acps_register_sensitivities(register):
        register("{name}", {cls})
"""

BROKEN_PLUGIN = """
    import acps_missing_dependency_for_tests  # noqa: F401 - the import error is the point
"""


def sensitivity_plugin(name: str, cls: str = "EpSensitivity") -> str:
    """Source of a plugin module registering one sensitivity class under ``name``."""
    return SENSITIVITY_PLUGIN.format(name=name, cls=cls)


@pytest.mark.slow
def test_an_installed_third_party_sensitivity_is_found_by_name(installer: PluginInstaller) -> None:
    installer.install("acps-test-epsens", "acps_test_epsens", sensitivity_plugin("EpSens"), version="1.2.3",
                      entry_points={"epsens": "acps_test_epsens"})

    method = get_registry().get("sensitivity", "EpSens")

    assert (method.plugin, method.distribution, method.version) == ("epsens", "acps-test-epsens", "1.2.3")
    assert method.class_path == "acps_test_epsens:EpSensitivity"
    assert type(resolve_method("sensitivity", "EpSens", "sensitivity")).__name__ == "EpSensitivity"


@pytest.mark.slow
def test_a_broken_plugin_is_skipped_with_a_warning_and_others_load(installer: PluginInstaller) -> None:
    installer.install("acps-test-broken", "acps_test_broken", BROKEN_PLUGIN, version="0.0.1",
                      entry_points={"brokenep": "acps_test_broken"})
    installer.install("acps-test-fine", "acps_test_fine", sensitivity_plugin("FineSens"))

    with pytest.warns(AcpsPluginWarning) as recorded:
        registry = Registry.build()

    messages = [str(w.message) for w in recorded if "brokenep" in str(w.message)]
    assert len(messages) == 1
    assert "acps-test-broken" in messages[0] and "0.0.1" in messages[0]
    assert "acps_missing_dependency_for_tests" in messages[0]
    assert registry.get("sensitivity", "FineSens").distribution == "acps-test-fine"
    [failure] = [f for f in registry.failures if f.plugin == "brokenep"]
    assert (failure.distribution, failure.disabled) == ("acps-test-broken", False)
    assert "ModuleNotFoundError" in failure.reason


@pytest.mark.slow
def test_two_distributions_registering_one_name_raise_naming_both(installer: PluginInstaller) -> None:
    installer.install("acps-test-dup-one", "acps_test_dup_one", sensitivity_plugin("DupSens", "OneSens"))
    installer.install("acps-test-dup-two", "acps_test_dup_two", sensitivity_plugin("DupSens", "TwoSens"))

    with pytest.raises(PluginError) as caught:
        Registry.build()

    message = str(caught.value)
    assert "'DupSens'" in message
    assert "acps-test-dup-one" in message and "acps-test-dup-two" in message
    assert "ACPS_DISABLE_PLUGINS" in message


@pytest.mark.slow
@pytest.mark.parametrize("disable", ["dup_two_ep", "acps-test-dup-two", " other , ACPS_TEST_DUP_TWO "],
                         ids=["entry point", "distribution", "in a list, other spelling"])
def test_disabling_a_plugin_skips_it_and_records_why(installer: PluginInstaller,
                                                     monkeypatch: pytest.MonkeyPatch, disable: str) -> None:
    installer.install("acps-test-dup-one", "acps_test_dup_one", sensitivity_plugin("DupSens", "OneSens"))
    installer.install("acps-test-dup-two", "acps_test_dup_two", sensitivity_plugin("DupSens", "TwoSens"),
                      entry_points={"dup_two_ep": "acps_test_dup_two"})
    monkeypatch.setenv("ACPS_DISABLE_PLUGINS", disable)

    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        registry = Registry.build()

    assert registry.get("sensitivity", "DupSens").distribution == "acps-test-dup-one"
    [failure] = [f for f in registry.failures if f.distribution == "acps-test-dup-two"]
    assert failure.disabled and "ACPS_DISABLE_PLUGINS" in failure.reason
    assert not [w for w in recorded if "acps-test-dup-two" in str(w.message)]


@pytest.mark.slow
def test_a_distribution_found_twice_on_sys_path_is_loaded_once(installer: PluginInstaller,
                                                               tmp_path: Path) -> None:
    for site in (tmp_path / "site-a", tmp_path / "site-b"):
        installer.install("acps-test-twice", "acps_test_twice", sensitivity_plugin("TwiceSens"), site=site)

    registry = Registry.build()

    twice = [m.name for m in registry.methods("sensitivity") if m.distribution == "acps-test-twice"]
    assert twice == ["TwiceSens"]
    assert not [f for f in registry.failures if f.distribution == "acps-test-twice"]


# --- the registry's modules ------------------------------------------------------------------------------------


def test_the_registry_module_still_offers_every_name_other_code_imports_from_it() -> None:
    from acps_core.methods import loading, resolve, table

    names = ["get_registry", "resolve_method", "register_plugin", "unregister_plugin", "format_plugins_table",
             "Registry", "MethodInfo", "PluginFailure", "AcpsPluginWarning", "MethodArgumentError",
             "AcpsPluginManager", "get_plugin_manager", "DISABLE_ENV_VAR", "IN_PROCESS", "KINDS", "METHOD_BASES",
             "PARAMETER_BY_KIND"]
    assert all(hasattr(registry_module, name) for name in names)
    assert registry_module.resolve_method is resolve.resolve_method
    assert registry_module.format_plugins_table is table.format_plugins_table
    assert registry_module.AcpsPluginManager is loading.AcpsPluginManager


def test_each_module_of_the_methods_package_stays_readable_in_one_sitting() -> None:
    folder = Path(registry_module.__file__).parent
    lengths = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    assert {name: length for name, length in lengths.items() if length > 400} == {}


def test_a_missing_built_in_method_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACPS_DISABLE_PLUGINS", "acps-search-knapsack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registry = Registry.build()
    with pytest.raises(PluginError) as caught:
        registry.get("search", "KnapsackSearch")
    message = str(caught.value)
    assert "from the distribution acps-search-knapsack" in message
    assert "pip install 'acps-core[all]'" in message
    with pytest.raises(PluginError) as caught:
        registry.get("search", "MySearch")
    assert "pip install" not in str(caught.value)
