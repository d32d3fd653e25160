"""mllmkit: assemble, train and chat with multimodal LLMs from plugins and TOML recipes.

Public API: :func:`load_recipe`, :func:`assemble`, :func:`build`, :func:`check_wiring`,
:func:`chat_session` (see :mod:`mllmkit.chat`), and the
plugin contract in :mod:`mllmkit.hookspecs` (``hookimpl``, ``ComponentSpec``).
"""

from mllmkit.assemble import assemble, build, check_wiring
from mllmkit.chat import chat_session
from mllmkit.hookspecs import hookimpl
from mllmkit.recipe import load_recipe
from mllmkit.registry import ComponentSpec

__version__ = "0.1.0"

__all__ = ["load_recipe", "assemble", "build", "check_wiring", "chat_session", "hookimpl", "ComponentSpec",
           "__version__"]
