"""python -m pnewton.info: the build and the running environment, for a bug report."""
from pnewton._config import show_config

print(show_config())
