"""Which values count as secrets, and masking them in text and nested data."""

from __future__ import annotations

from dispatch.core.model_catalog import BUILTIN_MODELS, environment_keys
from dispatch.core.secrets import Masker, credential_values


def test_credentials_are_found_by_name_but_paths_words_and_short_values_are_not() -> None:
    environ = {"ANTHROPIC_API_KEY": "fake-ant-0123456789", "GITHUB_TOKEN": "ghp_abcdef123456",
               "PGPASSWORD": "s3cr3t!pw", "SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1", "AUTH_MODE": "production",
               "API_KEY": "short",
               "HOME": "/root", "EDITOR": "vim-with-a-long-name-1", "TOKEN_TTL": "3600000000"}
    assert sorted(credential_values(environ)) == ["fake-ant-0123456789", "ghp_abcdef123456", "s3cr3t!pw"]


def test_masker_masks_longest_first_in_text_and_nested_data() -> None:
    masker = Masker(["abcdefgh12", "abcdefgh1234", "tiny"])
    assert masker.mask("x abcdefgh1234 y abcdefgh12 tiny") == "x *** y *** tiny"
    data = {"reason": "key abcdefgh12", "attempts": [{"reason": "abcdefgh1234"}], "n": 3, "abcdefgh12": None}
    assert masker.mask_data(data) == {"reason": "key ***", "attempts": [{"reason": "***"}], "n": 3, "***": None}
    assert not Masker(["short"]) and Masker(["long enough"])


def test_a_models_key_comes_from_its_own_variable_only() -> None:
    names = ["glm", "minimax", "claude", "opencode"]
    caller = {"ZAI_API_KEY": "zai-1234567890", "ANTHROPIC_API_KEY": "fake-ant-1234567890"}
    found = environment_keys(names, BUILTIN_MODELS, {"minimax": {"ANTHROPIC_AUTH_TOKEN": "from-block"}}, caller.get)
    assert found == {"glm": {"ANTHROPIC_AUTH_TOKEN": "zai-1234567890"},
                     "minimax": {"ANTHROPIC_AUTH_TOKEN": "from-block"},
                     "claude": {"ANTHROPIC_API_KEY": "fake-ant-1234567890"}}
