"""The registry mechanism: built-ins by reading source, runtime registration, entry points, dotted paths, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import BUILTIN_CONNECTORS, ENCODER_NAMES, LLM_NAMES
from torch import nn

from connector_zoo.registry import Registry, RegistryError
from connectors import CONNECTORS, build_connector
from connectors.base import PerTokenConnector
from encoders import ENCODERS
from llms import LLMS


def test_builtin_names_are_the_ones_asked_for():
    assert sorted(ENCODERS.builtins()) == sorted(ENCODER_NAMES) == ["clip", "dinov2", "eva-vit-g", "fused", "siglip"]
    assert sorted(LLMS.builtins()) == LLM_NAMES == ["qwen3", "tinyllama", "vicuna"]
    assert sorted(CONNECTORS.builtins()) == BUILTIN_CONNECTORS
    for registry in (ENCODERS, LLMS, CONNECTORS):  # each name resolves to a class registered under that name
        for name in registry.builtins():
            assert registry.get(name).registered_name == name


def test_listing_imports_no_implementation():
    code = (
        "import sys, connectors, encoders, llms; "
        "[r.entries() for r in (connectors.CONNECTORS, encoders.ENCODERS, llms.LLMS)]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'timm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pattern_name_gives_depth():
    conn = build_connector("mlp3x_gelu", 8, 16)
    assert conn.depth == 3 and conn.spec == {"name": "mlp3x_gelu"}
    assert len([m for m in conn.layers if isinstance(m, nn.Linear)]) == 3


def test_unknown_name_suggests_close_matches():
    with pytest.raises(RegistryError) as err:
        CONNECTORS.get("mlp2x_gelo")
    msg = str(err.value)
    assert "did you mean 'mlp2x_gelu'" in msg and "available: " in msg and "linear" in msg


def test_duplicate_name_raises():
    reg = Registry("connector", "connectors", "connector_zoo.test_group", "connectors.base:Connector")

    @reg.register("dup")
    class A(PerTokenConnector):
        pass

    with pytest.raises(RegistryError, match="already registered"):

        @reg.register("dup")
        class B(PerTokenConnector):
            pass

    with pytest.raises(RegistryError, match="is a built-in"):

        @reg.register("linear")
        class C(PerTokenConnector):
            pass


def test_dotted_path_must_name_a_connector():
    assert CONNECTORS.get("connectors.linear:LinearConnector").registered_name == "linear"
    with pytest.raises(RegistryError, match="not a subclass"):
        CONNECTORS.get("collections:OrderedDict")
    with pytest.raises(RegistryError, match="failed to import"):
        CONNECTORS.get("no_such_module_xyz:Thing")


def make_distribution(root, dist: str, module: str, source: str, entry_points: str) -> None:
    """An on-path distribution with real entry-point metadata (what `pip install` would leave)."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_entry_point_plugin_and_broken_plugin(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "zoo_plugin_ok",
        "zoo_plugin_ok",
        """
        from torch import nn
        from connectors.base import PerTokenConnector

        class Doubler(PerTokenConnector):
            '''Twice a linear map (test plugin).'''
            def __init__(self, in_dim, out_dim, feature_select="patch"):
                super().__init__(in_dim, out_dim, feature_select)
                self.proj = nn.Linear(in_dim, out_dim)
            def project(self, tokens):
                return 2 * self.proj(tokens)
        """,
        "[connector_zoo.connectors]\ndoubler = zoo_plugin_ok:Doubler\n",
    )
    make_distribution(
        tmp_path,
        "zoo_plugin_broken",
        "zoo_plugin_broken",
        "raise ImportError('needs libfoo')\n",
        "[connector_zoo.connectors]\nbroken = zoo_plugin_broken:Thing\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    CONNECTORS.refresh()
    try:
        conn = build_connector("doubler", 4, 6)
        assert type(conn).__name__ == "Doubler"
        entries = {e.name: e for e in CONNECTORS.entries()}
        assert entries["doubler"].origin == "plugin (zoo_plugin_ok 0.1)"
        assert entries["doubler"].description == "Twice a linear map (test plugin)."
        assert "needs libfoo" in entries["broken"].error  # listed with its error; the others still work
        with pytest.raises(RegistryError, match=r"'broken' \(plugin \(zoo_plugin_broken 0.1\).*needs libfoo"):
            CONNECTORS.get("broken")
        assert CONNECTORS.get("linear").registered_name == "linear"
    finally:
        CONNECTORS.refresh()


def test_encoder_and_llm_plugins_through_entry_points_and_register(tmp_path, monkeypatch, encoders, llms):
    """The same three ways work for encoders and LLM backends: an entry point of an installed distribution, the public
    ``@register`` decorator in-process, and the parts compose into a VLM that trains."""
    import torch
    from conftest import CONV_A, batch, images

    from connector_zoo.model.vlm import VLM
    from encoders import build_encoder
    from encoders import register as register_encoder
    from encoders.clip import CLIPEncoder
    from llms import build_llm

    make_distribution(
        tmp_path,
        "zoo_parts",
        "zoo_parts",
        """
        from encoders.clip import CLIPEncoder
        from llms.llama import TinyLlamaBackend

        class LastLayerCLIP(CLIPEncoder):
            '''CLIP features from the last layer (test plugin).'''
            def __init__(self, checkpoint, layer=-1, **kwargs):
                super().__init__(checkpoint, layer=layer, **kwargs)

        class ShoutingLlama(TinyLlamaBackend):
            '''TinyLlama under a name of its own (test plugin).'''
        """,
        "[connector_zoo.encoders]\nlastclip = zoo_parts:LastLayerCLIP\n"
        "[connector_zoo.llms]\nshout = zoo_parts:ShoutingLlama\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ENCODERS.refresh()
    LLMS.refresh()
    try:
        enc, llm = build_encoder("lastclip"), build_llm("shout")
        assert type(enc).__name__ == "LastLayerCLIP" and enc.layer == -1 and enc.registered_name == "lastclip"
        assert type(llm).__name__ == "ShoutingLlama" and llm.spec["name"] == "shout"
        assert {e.name: e.origin for e in ENCODERS.entries()}["lastclip"] == "plugin (zoo_parts 0.1)"
        assert {e.name: e.description for e in LLMS.entries()}["shout"].startswith("TinyLlama under a name of its own")
        # same weights, same layer: the feature cache still tells the plugin class from the built-in one
        same = build_encoder("lastclip", layer=-2)
        assert (
            same.weights_hash() == encoders["clip"].weights_hash() and same.cache_key() != encoders["clip"].cache_key()
        )
        vlm = VLM(enc, build_connector("linear", enc.info.hidden_size, llm.hidden_size), llm)
        out = vlm(batch(llm, [CONV_A], [True], enc.preprocess(images(1))))
        assert torch.isfinite(out.loss)

        @register_encoder("runtime_clip")
        class RuntimeCLIP(CLIPEncoder):
            """CLIP registered in a notebook (test)."""

        assert type(build_encoder("runtime_clip")).__name__ == "RuntimeCLIP"
        assert {e.name: e.origin for e in ENCODERS.entries()}["runtime_clip"].startswith("runtime")
    finally:
        ENCODERS.refresh()
        LLMS.refresh()
        ENCODERS._classes.pop("runtime_clip", None)
        ENCODERS._runtime.pop("runtime_clip", None)
