import sys
from pathlib import Path

# the repo is a folder of scripts, not a package: make its top-level modules importable
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
