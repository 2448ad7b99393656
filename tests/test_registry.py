import pytest

import segresmamba


def test_list_and_create():
    names = segresmamba.list_models()
    assert {"segresmamba", "segresmamba_notom"} <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown model 'segresmambo'.*segresmamba_notom"):
        segresmamba.create_model("segresmambo", 1, 2, 48)


@pytest.mark.parametrize("size", [0, (48, 48), (48, -1, 48)])
def test_bad_img_size(size):
    with pytest.raises(ValueError, match="img_size"):
        segresmamba.create_model("segresmamba_notom", 1, 2, size)


def test_bad_channels():
    with pytest.raises(ValueError, match="in_channels and out_channels"):
        segresmamba.create_model("segresmamba_notom", 0, 2, 48)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        segresmamba.register_model("segresmamba")(lambda **kw: None)
