"""Run the real `prefpipe` command in-process (startup is seconds per subprocess; a suite of hundreds of
malformed inputs cannot afford that) and return its exit code and everything it printed."""
import sys

from flows import app as cli


def run_prefpipe(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `prefpipe ARGV`, through flows.app.main as the console script runs it."""
    monkeypatch.setattr(sys, "argv", ["prefpipe", *map(str, argv)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """(exit code, stdout and stderr together)."""
    code, out, err = run_prefpipe(args, monkeypatch, capsys)
    return code, out + err
