import os
import sys
import tempfile

# the project's files are flat at the top level: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pretrain caches tokenised corpora on disk (train.TOKEN_CACHE): keep the tests' cache out of
# the user's home folder (subprocesses inherit it)
os.environ.setdefault("PTFT_CACHE", os.path.join(tempfile.gettempdir(), f"ptft-test-cache-{os.getpid()}"))
