import pytest
import torch

import segresmamba
from segresmamba.registry import check_patch, model_info

EVERY_MODEL = [
    "mednext", "nnunet", "segmamba", "segresmamba", "segresmamba_notom", "segresnet", "swinunetr", "unet", "unetr",
    "uxnet3d",
]


def test_every_model_is_registered_once_in_the_package():
    assert segresmamba.list_models() == EVERY_MODEL
    for name in EVERY_MODEL:
        info = model_info(name)
        assert info.name == name and info.factory.__module__.startswith("segresmamba.models.")
        assert info.citation and info.min_side >= 1


@pytest.mark.parametrize("name", ["unet", "segresnet", "nnunet"])
def test_create_builds_a_net_of_the_asked_shape(name):
    patch = max(32, model_info(name).min_side)
    net = segresmamba.create_model(name, in_channels=2, out_channels=3, img_size=patch).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 2, patch, patch, patch))
    assert out.shape == (1, 3, patch, patch, patch)


def test_metadata_matches_what_the_nets_enforce():
    # the registry's stride is the one the factory checks: a patch off by the stride is refused by both
    for name in ["segresmamba", "swinunetr", "unetr", "segmamba"]:
        info = model_info(name)
        good = max(info.min_side, info.stride * 3)
        assert check_patch(name, good) == (good,) * 3
        with pytest.raises(ValueError, match=f"{name} needs a patch"):
            check_patch(name, good + info.stride // 2)
    with pytest.raises(ValueError, match=r"every side >= 48.*use e.g. \(48, 48, 64\)"):
        check_patch("segresmamba", (32, 48, 64))
    with pytest.raises(ValueError, match="needs every side"):
        segresmamba.create_model("swinunetr", 1, 2, (64, 64, 48))


def test_paper_parameter_counts_are_table_7s():
    assert model_info("segresmamba").paper_params_m == 119.98
    assert model_info("swinunetr").paper_params_m == 62.19
    assert model_info("segresnet").paper_params_m is None
    assert model_info("nnunet").deep_supervision and not model_info("segresmamba").deep_supervision


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown model 'segresmambo'.*segresmamba_notom"):
        segresmamba.create_model("segresmambo", 1, 2, 48)
    with pytest.raises(ValueError, match="unknown model"):
        check_patch("segresmambo", 48)


@pytest.mark.parametrize("size", [0, (48, 48), (48, -1, 48)])
def test_bad_img_size(size):
    with pytest.raises(ValueError, match="img_size"):
        segresmamba.create_model("segresmamba_notom", 1, 2, size)


def test_bad_channels():
    with pytest.raises(ValueError, match="in_channels and out_channels"):
        segresmamba.create_model("segresmamba_notom", 0, 2, 48)


def test_registration_needs_its_facts_and_a_free_name():
    with pytest.raises(ValueError, match="already registered"):
        segresmamba.register_model("segresmamba", stride=16, citation="x")(lambda **kw: None)
    with pytest.raises(ValueError, match="citation"):
        segresmamba.register_model("newnet", stride=16, citation="")
    with pytest.raises(ValueError, match="lower case"):
        segresmamba.register_model("NewNet", stride=16, citation="x")
