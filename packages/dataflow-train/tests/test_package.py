from importlib.metadata import version

import dataflow.train as package


def test_version_is_single_sourced():
    assert package.__version__ == version("dataflow-train")
