"""chat.render: the built-in Falcon format, the model's chat template, and input validation."""

from __future__ import annotations

import json

import pytest

from falcon_service.api.chat import DEFAULT_CHAT_STOP, ChatTemplateError, message_text, render

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a bird"},
]



def test_builtin_falcon_format_exact():
    assert render(CONVERSATION) == "Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Name a bird\nAssistant:"


def test_builtin_format_without_system_and_with_name_field():
    messages = [{"role": "user", "content": "Hi", "name": "ann"}]
    assert render(messages) == "User: Hi\nAssistant:"


def test_system_messages_go_first_and_are_joined():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Answer in English."},
    ]
    assert render(messages) == "Be brief.\nAnswer in English.\nUser: Hi\nAssistant:"


def test_whole_conversation_is_rendered_in_order():
    prompt = render(CONVERSATION)
    positions = [prompt.index(m["content"]) for m in CONVERSATION]
    assert positions == sorted(positions)
    assert prompt.count("User:") == 2 and prompt.count("Assistant:") == 2


def test_the_models_chat_template_renders_the_plain_messages():
    """The template (`EngineClient.chat_template`) gets the messages as plain text, with the extra system text
    first."""
    messages = [*CONVERSATION[:3], {"role": "user", "content": [{"type": "text", "text": "Name a bird"}]}]
    prompt = render(messages, lambda plain: json.dumps(plain), system="Tools: none.")
    assert json.loads(prompt) == [{"role": "system", "content": "Tools: none."}, *CONVERSATION]


def test_unknown_role_is_rejected_naming_it_and_the_allowed_roles():
    messages = [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "42"}]
    with pytest.raises(ChatTemplateError) as excinfo:
        render(messages)
    message = str(excinfo.value)
    assert "'robot'" in message and "messages[1]" in message
    assert all(role in message for role in ("system", "user", "assistant", "tool"))
    assert isinstance(excinfo.value, ValueError)


def test_tool_calls_and_their_results_are_rendered_into_the_history():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    prompt = render(messages, system="You can call weather.")
    # an earlier call in the format a reply writes it (api/tool_calls.py), so the model sees its own form
    assert prompt == ('You can call weather.\nUser: Weather in Paris?\n'
                      'Assistant: <tool_call>{"name":"weather","arguments":{"city":"Paris"}}\n'
                      'Tool result: 18 C, sunny\nAssistant:')


def test_missing_role_is_rejected():
    with pytest.raises(ChatTemplateError, match="None"):
        render([{"content": "Hi"}])


def test_empty_conversation_is_rejected():
    with pytest.raises(ChatTemplateError):
        render([])


def test_text_parts_are_joined_with_newlines():
    content = [{"type": "text", "text": "Look:"}, {"type": "text", "text": "a falcon"}]
    assert message_text(content) == "Look:\na falcon"
    assert render([{"role": "user", "content": content}]) == "User: Look:\na falcon\nAssistant:"


def test_plain_and_missing_content():
    assert message_text("just text") == "just text"
    assert message_text(None) == ""


def test_image_part_is_rejected():
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/falcon.png"}},
    ]
    with pytest.raises(ChatTemplateError, match="image_url"):
        message_text(content)
    with pytest.raises(ChatTemplateError, match="image_url"):
        render([{"role": "user", "content": content}])


def test_default_chat_stop_ends_at_the_next_user_turn():
    assert DEFAULT_CHAT_STOP == ["\nUser:"]
    assert render(CONVERSATION).count(DEFAULT_CHAT_STOP[0]) == 2
