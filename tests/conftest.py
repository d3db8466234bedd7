import os
import sys

# `configs/` lives at the repository root, beside the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
