"""Base class for pretrained encoders that are used but never trained."""

import os

from torch import nn


class FrozenModule(nn.Module):
    """
    A module whose parameters are frozen and which always stays in eval mode.

    Lightning calls ``.train()`` on the whole LightningModule at the start of every training epoch; a frozen
    encoder must nevertheless keep dropout off and use its running statistics, so ``train`` is overridden to
    always switch to eval mode. Subclasses call ``self.freeze()`` at the end of ``__init__``.
    """

    def freeze(self) -> None:
        """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenModule":
        """Ignore ``mode``: a frozen module is always in eval mode."""
        return super().train(False)


def looks_local(pretrained: str) -> bool:
    """
    True if ``pretrained`` names a local folder rather than a Hugging Face hub id.

    A hub id has the form ``name`` or ``org/name``; anything that starts like a file-system path (``/``, ``.``,
    ``~``) or has more than one ``/`` is taken as a local folder.
    """
    return pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1


def check_local_path(pretrained: str, hint: str) -> None:
    """Raise FileNotFoundError if ``pretrained`` is meant as a local folder (``looks_local``) but does not exist."""
    if looks_local(pretrained) and not os.path.isdir(os.path.expanduser(pretrained)):
        raise FileNotFoundError(f"pretrained={pretrained!r} is not an existing local folder. {hint}")
