"""Fixtures of the dashboard's tests (test_dashboard.py, test_dashboard_security.py): a workdir with the
session's attention model, two photos, and Streamlit's AppTest for the page."""
import shutil
import sys

import pytest

from tests.helpers import APP, dashboard


@pytest.fixture
def workdir(attention_model, tmp_path):
    """A fresh workdir holding a copy of the fixture's best model."""
    _, best = attention_model
    (tmp_path / "work" / "models").mkdir(parents=True)
    shutil.copy(best, tmp_path / "work" / "models" / "best.pt")
    return tmp_path / "work"


@pytest.fixture
def photos(shapes_data):
    return sorted((shapes_data / "Images").glob("*.jpg"))[:2]


@pytest.fixture
def app(monkeypatch):
    """AppTest for the dashboard with these command-line arguments, served as if on `host` (the address
    `dashboard --host` gives Streamlit; the page reads it back); the server's models and password count
    start empty."""
    st = pytest.importorskip("streamlit")
    from streamlit import config
    from streamlit.testing.v1 import AppTest
    before = [config.get_option(o) for o in ("server.address", "client.showErrorDetails")]
    dash = dashboard()

    def make(*argv, host="127.0.0.1"):
        st.cache_resource.clear()
        dash.forget_models()
        dash._FAILURES.clear()
        config.set_option("server.address", host)
        monkeypatch.setattr(sys, "argv", ["dashboard.py", *map(str, argv)])
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        assert not at.exception, at.exception
        return at
    yield make
    config.set_option("server.address", before[0])
    config.set_option("client.showErrorDetails", before[1])   # the page turns the details off
