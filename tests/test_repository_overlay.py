"""`ditserve serve --set MODEL.PARAM=VALUE`: parameters rewritten in a copy of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ditserve.repository import overlay

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def parameters(repo: Path, model: str) -> dict[str, str]:
    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def test_overlay_sets_declared_parameters(tmp_path):
    repo = overlay(REPOSITORY, ["flux_denoiser.sp_degree=2", "flux_denoiser.gpus=0,1", "flux_vae_decoder.model_path=x y"],
                   tmp_path / "repo")
    assert parameters(repo, "flux_denoiser")["sp_degree"] == "2"
    assert parameters(repo, "flux_denoiser")["gpus"] == "0,1"
    assert parameters(repo, "flux_vae_decoder")["model_path"] == "x y"
    original = parameters(REPOSITORY, "flux_denoiser")
    assert {k: v for k, v in parameters(repo, "flux_denoiser").items() if k not in ("sp_degree", "gpus")} == \
        {k: v for k, v in original.items() if k not in ("sp_degree", "gpus")}
    assert (repo / "flux_denoiser" / "1" / "model.py").read_text() == (REPOSITORY / "flux_denoiser" / "1" / "model.py").read_text()
    assert original["sp_degree"] == "1"  # the checked-in repository is untouched


@pytest.mark.parametrize("value", [
    "dir\\", "C:\\models\\x", "a\\nb", "\\012", 'say "hi"', '\\"', "ünïcode €🙂", "tab\tand\nnewline", "", "x y",
])
def test_overlay_values_come_back_exactly(tmp_path, value):
    """A value is escaped for the protobuf text format: written raw, a backslash broke the config (`dir\\`: a
    ParseError, `C:\\models\\x`: a unicodeescape error) or changed the value (`a\\nb` became a newline)."""
    from ditserve.model_config import config_parameters, read_config

    repo = overlay(REPOSITORY, [f"flux_vae_decoder.model_path={value}"], tmp_path / "repo")
    assert parameters(repo, "flux_vae_decoder")["model_path"] == value
    assert config_parameters(read_config(repo, "flux_vae_decoder"))["model_path"] == value
    # set twice: the second --set finds the line the first one wrote
    again = overlay(REPOSITORY, [f"flux_vae_decoder.model_path={value}", f"flux_vae_decoder.model_path={value}2"],
                    tmp_path / "again")
    assert parameters(again, "flux_vae_decoder")["model_path"] == value + "2"


@pytest.mark.parametrize("setting, message", [
    ("flux_denoiser.sp_degree", "expected MODEL.PARAMETER=VALUE"),
    ("no_such_model.x=1", "no model 'no_such_model'"),
    # A typo would otherwise be a new parameter that nothing reads: every parameter a model reads is declared.
    ("flux_denoiser.sp_degre=2", "flux_denoiser's config.pbtxt declares no parameter 'sp_degre'; it declares: "
                                 "FORCE_CPU_ONLY_INPUT_TENSORS, attention_backend, cfg_parallel, cuda_graphs, "),
    ("flux_t2i.sp_degree=2", "flux_t2i's config.pbtxt declares no parameter 'sp_degree'; it declares: none"),
])
def test_overlay_rejects_bad_settings(tmp_path, setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        overlay(REPOSITORY, [setting], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_overlay_refuses_a_parameter_declared_in_a_form_it_cannot_rewrite(tmp_path):
    source = tmp_path / "source"
    (source / "m").mkdir(parents=True)
    (source / "m" / "config.pbtxt").write_text('name: "m"\nparameters [ { key: "x" value: { string_value: "1" } } ]\n')
    with pytest.raises(ValueError, match="parameter 'x' is not declared on one line"):
        overlay(source, ["m.x=2"], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
