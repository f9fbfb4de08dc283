"""`ditserve serve --set MODEL.PARAM=VALUE`: parameters rewritten in a copy of the repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ditserve.repository import overlay

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def parameters(repo: Path, model: str) -> dict[str, str]:
    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def test_overlay_sets_existing_and_new_parameters(tmp_path):
    repo = overlay(REPOSITORY, ["flux_denoiser.sp_degree=2", "flux_denoiser.gpus=0,1", "flux_vae_decoder.extra=x y"],
                   tmp_path / "repo")
    assert parameters(repo, "flux_denoiser")["sp_degree"] == "2"
    assert parameters(repo, "flux_denoiser")["gpus"] == "0,1"
    assert parameters(repo, "flux_vae_decoder")["extra"] == "x y"
    original = parameters(REPOSITORY, "flux_denoiser")
    assert {k: v for k, v in parameters(repo, "flux_denoiser").items() if k not in ("sp_degree", "gpus")} == \
        {k: v for k, v in original.items() if k not in ("sp_degree", "gpus")}
    assert (repo / "flux_denoiser" / "1" / "model.py").read_text() == (REPOSITORY / "flux_denoiser" / "1" / "model.py").read_text()
    assert original["sp_degree"] == "1"  # the checked-in repository is untouched


@pytest.mark.parametrize("setting, message", [
    ("flux_denoiser.sp_degree", "expected MODEL.PARAMETER=VALUE"),
    ("no_such_model.x=1", "no model 'no_such_model'"),
    ('flux_denoiser.gpus="0"', "cannot contain quotes"),
])
def test_overlay_rejects_bad_settings(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        overlay(REPOSITORY, [setting], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
