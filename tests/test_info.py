"""geokern.info(): what is built and available here."""

import geokern


def test_info_reports_backends():
    info = geokern.info()
    assert info["geokern"] == geokern.__version__
    assert "torch" in info["backends"]
    if info["cuda_extension"] is not None:
        assert info["cuda_extension"]["archs"]
