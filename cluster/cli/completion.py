"""`cave completion bash|zsh`: a completion script made from the parser itself, so it never lags
behind the commands. Static words only (commands, verbs, options): nothing runs at <TAB>."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")

_BASH = """\
# cave completion for bash; load it with: source <(cave completion bash)
_cave_complete() {
    local cur path word
    cur="${COMP_WORDS[COMP_CWORD]}"
    path=""
    for word in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
        [[ "$word" == "--" ]] && return 0
        [[ "$word" == -* ]] && continue
        case "$path $word" in
%(known)s
        esac
    done
    case "$path" in
%(words)s
    esac
}
complete -o default -F _cave_complete cave
"""

_ZSH_PREAMBLE = "# cave completion for zsh; load it with: source <(cave completion zsh)\n"
_ZSH_BASHCOMPAT = "autoload -U +X bashcompinit && bashcompinit\n"


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` for `shell` (one of SHELLS)."""
    table = _words_by_path(parser, "")
    known = "\n".join(f'            "{p}") path="{p}" ;;' for p in table if p)
    words = "\n".join(
        f'        "{p}") COMPREPLY=($(compgen -W "{" ".join(w)}" -- "$cur")) ;;'
        for p, w in table.items()
    )
    bash = _BASH % {"known": known, "words": words}
    return bash if shell == "bash" else _ZSH_PREAMBLE + _ZSH_BASHCOMPAT + bash


def _words_by_path(parser: argparse.ArgumentParser, path: str) -> dict[str, list[str]]:
    """{"": [up, down, sandbox, ...], " sandbox": [run, ls, ...], ...}: what may follow a path."""
    words: list[str] = []
    table: dict[str, list[str]] = {path: words}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words.append(name)
                table.update(_words_by_path(sub, f"{path} {name}"))
        elif action.option_strings:
            words.extend(s for s in action.option_strings if s.startswith("--"))
        elif action.choices:  # a positional with fixed values (`cave completion SHELL`)
            words.extend(str(choice) for choice in action.choices)
    return table
