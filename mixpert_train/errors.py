"""The one exception type users see: a one-line message naming the file, tensor or flag, and the fix.

CLIs catch it and print `error: <message>` with exit status 2; nothing else is caught that way.
"""


class MixpertError(Exception):
    """An error the user can act on. Its message is one line and names what to fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def require_device(flag: str, device, fix: str) -> None:
    """Refuse, in one line naming the flag, a device that is not cpu / cuda[:N], or CUDA where torch sees none
    (torch itself would raise an AssertionError or "Cannot access accelerator device" deep inside)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MixpertError(f"{flag} {device}: not a device; choose cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise MixpertError(f"{flag} {device}: choose cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise MixpertError(f"{flag} {device}: torch {torch.__version__} here is {build}; {fix}")
