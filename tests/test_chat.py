"""Chat prompts: the template semantics (Hugging Face's `apply_chat_template` with
`add_generation_prompt=True`), and chat requests through the public API: the end-of-turn
token ends the answer; a model without a template answers INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json

import pytest

import pdserve_cli
from orchestrator.frontend import GenerateInput, InvalidRequest
from shared.chat import ChatError, ChatMessage, render_chat
from shared.client.generator import GenerateError
from shared.config import ModelConfig
from shared.engine.engine import Engine, Params
from shared.tokenizer import ByteTokenizer, ChatFormat
from shared.weights.model_info import ModelInfo
from tests.cluster_harness import InProcessCluster
from tests.reference import reference_greedy

USER = [ChatMessage("user", "Hi")]


def test_template_whitespace_control_is_hugging_faces():
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indent before it
    # (not before an expression).
    template = (
        "{% for m in messages %}\n  {% if m.role %}{{ m.role }}: {{ m.content }}|{% endif %}\n"
        "{% endfor %}"
    )
    chat = ChatFormat(template)
    messages = [*USER, ChatMessage("assistant", "Yo")]
    assert render_chat(chat, messages) == "user: Hi|assistant: Yo|"
    assert (
        render_chat(ChatFormat("{% for m in messages %}\n  {{ m.role }}\n{% endfor %}"), USER)
        == "  user\n"
    )


def test_template_variables_filters_and_globals():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}<go>{% endif %}{{ eos_token }}"
    )
    chat = ChatFormat(template, bos_token="<s>", eos_token="</s>")
    messages = [
        ChatMessage("user", "café"),
        ChatMessage("assistant", "b"),
        ChatMessage("user", "c"),
    ]
    expected = '<s>{"role": "user", "content": "café"}{"role": "assistant", "content": "b"}<go></s>'
    assert render_chat(chat, messages) == expected


def test_template_errors_and_empty_chats_are_chat_errors():
    refusing = ChatFormat("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatError, match="roles must alternate"):
        render_chat(refusing, USER)
    with pytest.raises(ChatError, match="messages is empty"):
        render_chat(ChatFormat("x"), [])
    with pytest.raises(ChatError, match="does not parse"):
        render_chat(ChatFormat("{% for %}"), USER)
    with pytest.raises(ChatError, match=r"messages\[0\]\.role is empty"):
        render_chat(ChatFormat("x"), [ChatMessage("", "Hi")])
    # The sandbox: templates cannot reach Python internals.
    with pytest.raises(ChatError):
        render_chat(
            ChatFormat(
                "{{ messages.__class__.__mro__ }}{{ ''.__class__.mro()[1].__subclasses__() }}"
            ),
            USER,
        )


# Through the API ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_chat_renders_the_template_and_the_end_of_turn_token_ends_it(
    engine: Engine, params: Params, tiny_fingerprint: str
):
    """tiny with a template that writes the messages' text, and an end-of-turn token picked
    from what greedy decoding will produce: the chat answer is the text prompt's answer,
    cut before that token, finish "stop" (and with ignore_eos, not cut)."""
    tokenizer = ByteTokenizer(320, bos_id=None)
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>"
    prompt_text = "[system]Be brief.[user]Hello>"
    full = reference_greedy(engine, params, tokenizer.encode(prompt_text), 12)
    end = full[5]
    cut = full[: full.index(end)]
    chat = ChatFormat(template, end_of_turn_ids=(end,))
    info = ModelInfo(ModelConfig.tiny(), tokenizer, chat)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]

    async def body() -> None:
        cluster = InProcessCluster(engine, params, tiny_fingerprint, model_info=info)
        await cluster.start()
        try:
            chunks = await cluster.api.generate(messages, max_tokens=12)
            assert [t for c in chunks for t in c.token_ids] == cut
            assert chunks[-1].finish_reason == "stop"
            assert chunks[-1].prompt_tokens == len(prompt_text)
            chunks = await cluster.api.generate(messages, max_tokens=12, ignore_eos=True)
            assert [t for c in chunks for t in c.token_ids] == full
            empty = GenerateInput("", None, None, 4, None, messages=())
            with pytest.raises(InvalidRequest, match="chat: messages is empty"):
                await anext(cluster.orchestrator.frontend.generate(empty, None))
        finally:
            await cluster.close()

    asyncio.run(body())


@pytest.mark.timeout(120)  # may be the test that starts the session's process cluster
def test_a_model_without_a_template_refuses_chat_over_grpc(process_cluster, capsys, tmp_path):
    async def body() -> None:
        with pytest.raises(GenerateError) as err:
            await process_cluster.api.generate([{"role": "user", "content": "Hi"}])
        assert err.value.code == "INVALID_ARGUMENT"
        assert "model 'tiny' has no chat template" in err.value.message
        # ... and the server keeps serving.
        chunks = await process_cluster.api.generate("Hi", max_tokens=3, ignore_eos=True)
        assert chunks[-1].completion_tokens == 3

    asyncio.run(body())
    target = ["--target", process_cluster.orchestrator.address]
    assert pdserve_cli.main(["generate", *target, "--chat", "Hi"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    bad = tmp_path / "messages.json"
    bad.write_text(json.dumps([{"role": "user"}]))
    assert pdserve_cli.main(["generate", *target, "--messages", str(bad)]) == 2
    assert "expected a non-empty JSON list" in capsys.readouterr().err
