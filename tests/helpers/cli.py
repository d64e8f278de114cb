"""Run `prefpipe` in-process (a subprocess re-imports every area: slow on 2 cores)."""
import sys


def run_prefpipe(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `prefpipe ARGV` through flows.app.main, as the console script runs it."""
    from flows import app

    monkeypatch.setattr(sys, "argv", ["prefpipe", *map(str, argv)])
    try:
        app.main()
        code = 0
    except SystemExit as ex:
        code = ex.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
