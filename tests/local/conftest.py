"""Local mode as its users run it: the `whisperx-local` command."""

from tests.runner.conftest import model_dir  # noqa: F401  (tiny.en's aligner folder)
