from importlib.metadata import version

import dataflow.store as package


def test_version_is_single_sourced():
    assert package.__version__ == version("dataflow-store")
