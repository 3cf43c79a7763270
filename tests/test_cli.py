"""The acps command line: demo, plugins, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from acps_core.cli import EXIT_BAD_INPUT, EXIT_OK, main
from acps_core.proto import retrain_config_pb2


def test_plugins_lists_the_three_built_in_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == EXIT_OK
    out = capsys.readouterr().out
    for kind, name, dist in [("sensitivity", "TaylorLossSensitivity", "acps-sensitivity-taylor"),
                             ("search", "GreedySearch", "acps-search-greedy"),
                             ("gain", "BitComplexity", "acps-gain-ascend")]:
        line = next(line for line in out.splitlines() if name in line)
        assert kind in line and dist in line


@pytest.mark.slow
def test_demo_trains_searches_and_writes_its_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == EXIT_OK
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


def test_bad_input_exits_2_with_one_readable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("acps: error:") and "missing" in err[0]
    assert "--debug" in err[1]


def test_search_prune_restore_and_export_from_the_command_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnxruntime
    import torch

    from tests.cli_models import small_cnn

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    torch.save([images, labels], tmp_path / "calib.pt")
    (tmp_path / "search.cfg").write_text("compress_ratio: 1.5\nascend_optimized: false\n")
    model = ["--model", "tests.cli_models:small_cnn", "--data", str(tmp_path / "calib.pt")]
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


@pytest.mark.parametrize(("argv", "words"), [
    (["search", "--model", "tests.cli_models:small_cnn", "--data", "{inputs}", "--config", "{cfg}", "--output",
      "{out}"], "holds only an input tensor; the search needs [input, labels]"),
    (["search", "--model", "{pickled}", "--data", "{calib}", "--config", "{cfg}", "--output", "{out}"],
     "--allow-pickle"),
    (["prune", "--model", "tests.cli_models:small_cnn", "--data", "{missing}", "--config", "{cfg}", "--record",
      "{out}"], "does not exist"),
    (["search", "--model", "tests.cli_models:small_cnn", "--data", "{badpair}", "--config", "{cfg}", "--output",
      "{out}"], "must hold [inputs, labels]"),
    (["restore", "--model", "tests.cli_models:small_cnn", "--data", "{calib}", "--config", "{prune}", "--record",
      "{missing}"], "record file does not exist"),
    (["restore", "--model", "tests.cli_models:small_cnn", "--data", "{calib}", "--config", "{cfg}", "--record",
      "{missing}"], "compress_ratio belongs in the search config"),
])
def test_command_line_mistakes_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv,
                                                    words) -> None:
    import torch

    from tests.cli_models import small_cnn

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
