"""weit: resize PyTorch models through Kronecker weight templates (WeiT / WAVE)."""

__version__ = "0.1.0"
FORMAT_VERSION = "1"
KRON_ORDER = "scaler_outer"
