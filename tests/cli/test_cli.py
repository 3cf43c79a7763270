"""The acps command line: demo, plugins, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from acps_core.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from acps_core.proto import retrain_config_pb2

#: The model factory the command-line calls name.
SMALL_CNN = "tests.support.cli_models:small_cnn"


def test_plugins_lists_the_three_built_in_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == EXIT_OK
    out = capsys.readouterr().out
    for kind, name, dist in [("sensitivity", "TaylorLossSensitivity", "acps-sensitivity-methods"),
                             ("search", "GreedySearch", "acps-search-greedy"),
                             ("gain", "BitComplexity", "acps-gain-estimators")]:
        line = next(line for line in out.splitlines() if name in line)
        assert kind in line and dist in line


@pytest.mark.slow
def test_demo_trains_searches_and_writes_its_configs_into_a_folder_of_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == EXIT_OK
    assert [p.name for p in tmp_path.iterdir()] == ["acps-demo"]  # nothing in the current folder itself
    tmp_path = tmp_path / "acps-demo"
    out = capsys.readouterr().out
    assert "achieved ratio" in out and "NOT reached" not in out
    figures = out.split("before fine-tuning: ")[1]
    copied = float(figures.split("%")[0])
    corrected = float(figures.split("images): ")[1].split("%")[0])
    reconstructed = float(figures.split("(reconstruct=False), ")[1].split("%")[0])
    assert corrected > copied  # the BatchNorm correction helps on the demo's pruned model
    assert reconstructed > corrected  # and re-fitting the layers that read removed channels helps more
    assert (tmp_path / "demo_prune.record").is_file()
    cfg = text_format.Parse((tmp_path / "demo_prune.cfg").read_text(), retrain_config_pb2.AMCTRetrainConfig())
    assert cfg.override_layer_configs
    assert (tmp_path / "demo_prune.cfg.selection").is_file()
    assert (tmp_path / "demo_search.cfg").is_file()
    assert (tmp_path / "demo_prune.cfg.report.png").is_file()  # in the set the search wrote


def test_the_demo_folder_is_ignored_by_git() -> None:
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().splitlines()
    assert "/acps-demo/" in ignored


def test_bad_input_exits_2_with_one_readable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert main(["demo", "--out", str(tmp_path / "file")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("acps: error:") and "exists and is not a folder" in err[0]
    assert "--debug" in err[1]


def test_search_prune_restore_and_export_from_the_command_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnxruntime
    import torch

    from tests.support.cli_models import small_cnn

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    torch.save([images, labels], tmp_path / "calib.pt")
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    model = ["--model", SMALL_CNN, "--data", str(tmp_path / "calib.pt")]
    assert main(["search", *model, "--config", str(tmp_path / "search.cfg"), "--output", str(tmp_path / "prune.cfg"),
                 "--search", "GlobalRankSearch", "--sensitivity", "GroupMagnitudeSensitivity"]) == EXIT_OK
    assert "achieved ratio" in capsys.readouterr().out
    assert (tmp_path / "prune.cfg.selection").is_file()

    assert main(["prune", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "p.record"),
                 "--save", str(tmp_path / "pruned.pt")]) == EXIT_OK
    assert "parameters; wrote the record" in capsys.readouterr().out
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert pruned.conv2.out_channels < 32

    assert main(["prune", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "c.record"),
                 "--save", str(tmp_path / "corrected.pt"), "--calibrate", "--no-reconstruct"]) == EXIT_OK
    corrected = torch.load(tmp_path / "corrected.pt", weights_only=False)
    assert (tmp_path / "c.record").read_text() == (tmp_path / "p.record").read_text()
    assert not torch.equal(corrected.bn2.running_mean, pruned.bn2.running_mean)  # the conv2 -> bn2 input changed
    assert all(torch.equal(a, b) for a, b in zip(corrected.parameters(), pruned.parameters()))
    assert main(["prune", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "r.record"),
                 "--save", str(tmp_path / "refitted.pt"), "--correct-norms"]) == EXIT_OK  # the older spelling
    refitted = torch.load(tmp_path / "refitted.pt", weights_only=False)
    changed = {n for (n, a), b in zip(refitted.named_parameters(), pruned.parameters()) if not torch.equal(a, b)}
    assert changed and all(n.endswith("weight") for n in changed)  # the layers reading removed channels
    assert main(["prune", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "x.record"),
                 "--no-reconstruct"]) == 2
    assert "--no-reconstruct only applies with --calibrate" in capsys.readouterr().err

    pruned.conv2.bias.data += 1.0  # "fine-tuned"
    torch.save(pruned.state_dict(), tmp_path / "tuned.pth")
    assert main(["restore", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "p.record"),
                 "--weights", str(tmp_path / "tuned.pth"), "--save", str(tmp_path / "restored.pt")]) == EXIT_OK
    restored = torch.load(tmp_path / "restored.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), pruned.eval()(images))

    assert main(["export", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "p.record"),
                 "--weights", str(tmp_path / "tuned.pth"), "--output", str(tmp_path / "model.onnx")]) == EXIT_OK
    (out,) = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input": images[:3].numpy()})
    with torch.no_grad():  # any batch size: the exported batch dimension is free
        np.testing.assert_allclose(out, restored(images[:3]).numpy(), rtol=1e-4, atol=1e-5)
    # the model the spec builds was never changed: its factory is seeded, so a fresh build is the reference
    assert small_cnn().conv2.out_channels == 32


def test_search_with_uniform_widths_keeps_one_width_per_block_role(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    torch.save([torch.randn(32, 16, generator=generator), torch.randint(0, 10, (32,), generator=generator)],
               tmp_path / "calib.pt")
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    model = ["--model", "tests.support.cli_models:stacked_mlp", "--data", str(tmp_path / "calib.pt")]
    assert main(["search", *model, "--config", str(tmp_path / "search.cfg"), "--output", str(tmp_path / "prune.cfg"),
                 "--uniform-widths"]) == EXIT_OK
    assert "uniform_widths: 3 groups" in (tmp_path / "prune.cfg.report.md").read_text()
    assert main(["prune", *model, "--config", str(tmp_path / "prune.cfg"), "--record", str(tmp_path / "p.record"),
                 "--save", str(tmp_path / "pruned.pt")]) == EXIT_OK
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert len({block[0].out_features for block in pruned.blocks}) == 1


@pytest.mark.parametrize(("argv", "words"), [
    (["search", "--model", SMALL_CNN, "--data", "{inputs}", "--config", "{cfg}", "--output",
      "{out}"], "holds only an input tensor; the search needs [input, labels]"),
    (["search", "--model", "{pickled}", "--data", "{calib}", "--config", "{cfg}", "--output", "{out}"],
     "--allow-pickle"),
    (["prune", "--model", SMALL_CNN, "--data", "{missing}", "--config", "{cfg}", "--record",
      "{out}"], "does not exist"),
    (["search", "--model", SMALL_CNN, "--data", "{badpair}", "--config", "{cfg}", "--output",
      "{out}"], "must hold [inputs, labels]"),
    (["restore", "--model", SMALL_CNN, "--data", "{calib}", "--config", "{prune}", "--record",
      "{missing}"], "record file does not exist"),
    (["restore", "--model", SMALL_CNN, "--data", "{calib}", "--config", "{cfg}", "--record",
      "{missing}"], "compress_ratio belongs in the search config"),
])
def test_command_line_mistakes_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv,
                                                    words) -> None:
    import torch

    from tests.support.cli_models import small_cnn

    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "inputs.pt")
    torch.save([torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))], tmp_path / "calib.pt")
    torch.save(small_cnn(), tmp_path / "model.pt")
    torch.save([torch.randn(4, 3, 8, 8), 3], tmp_path / "badpair.pt")
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\n")
    (tmp_path / "prune.cfg").write_text("prune_config { filter_pruner { balanced_l2_norm_filter_prune { "
                                        "prune_ratio: 0.5 } } }\n")
    paths = {"prune": tmp_path / "prune.cfg", "inputs": tmp_path / "inputs.pt", "calib": tmp_path / "calib.pt",
             "cfg": tmp_path / "search.cfg", "badpair": tmp_path / "badpair.pt",
             "out": tmp_path / "out.cfg", "missing": tmp_path / "missing.pt", "pickled": tmp_path / "model.pt"}
    assert main([a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("acps: error:") and words in err[0], err
    assert not (tmp_path / "out.cfg").exists()


@pytest.mark.parametrize("command", ["search", "prune", "restore", "export", "explain", "plugins", "demo"])
def test_every_command_has_complete_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: acps " + command)
    if command not in ("plugins", "demo"):
        assert "--model" in out and ("example" in out)


# The command line for real work: trained weights, options anywhere, warnings that say what to do ----------------

def _files(tmp_path: Path) -> dict[str, str]:
    import torch

    from tests.support.cli_models import small_cnn

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    torch.save([images, labels], tmp_path / "calib.pt")
    trained = small_cnn()
    with torch.no_grad():
        for parameter in trained.parameters():  # "trained": unlike any fresh initialisation
            parameter.mul_(1.5).add_(0.01)
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    return {name: str(tmp_path / name) for name in ("calib.pt", "trained.pth", "search.cfg", "prune.cfg")}


def test_weights_make_search_and_prune_see_the_trained_model(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import acps_core as acps
    from tests.support.cli_models import SmallCNN

    files = _files(tmp_path)
    model = ["--model", "tests.support.cli_models:untrained_cnn", "--weights", files["trained.pth"], "--data",
             files["calib.pt"]]
    assert main(["search", *model, "--config", files["search.cfg"], "--output", files["prune.cfg"],
                 "--sensitivity", "GroupMagnitudeSensitivity", "--search", "GlobalRankSearch", "--quiet"]) == EXIT_OK
    assert main(["prune", *model, "--config", files["prune.cfg"], "--record", str(tmp_path / "p.record"),
                 "--save", str(tmp_path / "p.pt")]) == EXIT_OK
    assert "warning" not in capsys.readouterr().err  # the same weights in both steps
    # the same decision as the API on the trained model itself
    trained = SmallCNN()
    trained.load_state_dict(torch.load(files["trained.pth"], weights_only=True))
    api = acps.create_prune_retrain_model(trained, torch.zeros(2, 3, 8, 8), files["prune.cfg"],
                                          tmp_path / "api.record")
    assert (tmp_path / "api.record").read_text() == (tmp_path / "p.record").read_text()
    saved = torch.load(tmp_path / "p.pt", weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), api.state_dict().values()))


def test_a_factory_with_fresh_weights_in_each_step_gets_a_warning_that_says_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _files(tmp_path)
    model = ["--model", "tests.support.cli_models:untrained_cnn", "--data", files["calib.pt"]]
    assert main(["search", *model, "--config", files["search.cfg"], "--output", files["prune.cfg"],
                 "--quiet"]) == EXIT_OK
    assert main(["prune", *model, "--config", files["prune.cfg"], "--record", str(tmp_path / "p.record")]) == EXIT_OK
    err = capsys.readouterr().err
    assert err.startswith("acps: warning: the model's weights differ from those auto_channel_prune_search ran on")
    assert "--weights TRAINED.pth" in err and "Warning:" not in err  # one readable line, not Python's form
    # restore without a checkpoint keeps the factory's weights: warned as well, with the options that fix it
    assert main(["restore", *model, "--config", files["prune.cfg"], "--record", str(tmp_path / "p.record")]) == 0
    assert "pass --base-weights TRAINED.pth" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_debug_work_before_and_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           where: str) -> None:
    files = _files(tmp_path)
    argv = ["search", "--model", SMALL_CNN, "--data", files["calib.pt"], "--config",
            files["search.cfg"], "--output", files["prune.cfg"]]
    assert main(["--quiet", *argv] if where == "before" else [*argv, "--quiet"]) == EXIT_OK
    assert capsys.readouterr().out == ""
    broken = [*argv[:-1], str(tmp_path / "missing" / "prune.cfg")]
    # --debug: the traceback before the one-line message, and still exit code 2 for bad input
    assert main(["--debug", *broken] if where == "before" else [*broken, "--debug"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "OutputPathError" in err
    assert err.rstrip().splitlines()[-1].startswith("acps: error:")


def test_explain_refuses_a_random_input_that_cannot_fit_in_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--model", SMALL_CNN, "--input-shape", "1,3,99999,99999"]) == 2
    err = capsys.readouterr().err
    assert "--input-shape 1,3,99999,99999 is 29,999,400,003 values" in err and "e.g. 1,3,224,224" in err


def test_explain_takes_trained_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _files(tmp_path)
    assert main(["explain", "--model", "tests.support.cli_models:untrained_cnn", "--weights", files["trained.pth"],
                 "--input-shape", "1,3,8,8"]) == EXIT_OK
    assert "conv1" in capsys.readouterr().out
    assert main(["explain", "--model", "tests.support.cli_models:untrained_cnn", "--weights", files["calib.pt"],
                 "--input-shape", "1,3,8,8"]) == EXIT_BAD_INPUT
    assert "--weights" in capsys.readouterr().err
