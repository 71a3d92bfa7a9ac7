from importlib.metadata import version

import dataflow.launch as package


def test_version_is_single_sourced():
    assert package.__version__ == version("dataflow-launch")


def test_cli_help_and_version(capsys):
    import pytest

    from dataflow.launch.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert package.__version__ in capsys.readouterr().out
