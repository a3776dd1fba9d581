"""Chat templates of the tool-calling families, written here in short (the same markers and shapes as the
published Qwen2.5, Hermes 2 Pro, Llama 3.1 JSON and Mistral templates, not their text): each renders the
``tools`` argument, assistant messages with ``tool_calls`` and ``tool`` messages."""

from __future__ import annotations

QWEN25 = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    '</tools>\nCall a function as <tool_call>\n{"name": <name>, "arguments": <args>}\n</tool_call><|im_end|>\n'
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    '{%- for c in m.tool_calls or [] %}\n<tool_call>\n{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

HERMES = (
    "{%- if tools %}<|im_start|>system\nYou are a function calling AI model. <tools> {{ tools | tojson }} "
    '</tools> For each call return <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>tool\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': "
    "c.function.arguments} | tojson }}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

LLAMA31_JSON = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    '{%- if tools %}\nRespond with a JSON function call {"name": name, "parameters": dict}, after '
    "<|python_tag|> if you like.{% for t in tools %}\n{{ t | tojson }}{% endfor %}{%- endif %}<|eot_id|>"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- for c in m.tool_calls %}{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
    "{%- endfor %}<|eom_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)

MISTRAL = (
    "{{ bos_token }}{%- if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or m.role == 'system' %}[INST] {{ m.content }}[/INST]"
    '{%- elif m.role == \'tool\' %}[TOOL_RESULTS] {"call_id": "{{ m.tool_call_id }}", "content": '
    "{{ m.content | tojson }}}[/TOOL_RESULTS]"
    "{%- elif m.tool_calls %}[TOOL_CALLS] [{%- for c in m.tool_calls %}{{ {'name': c.function.name, "
    "'arguments': c.function.arguments, 'id': c.id} | tojson }}{% if not loop.last %}, {% endif %}"
    "{%- endfor %}]{{ eos_token }}"
    "{%- else %}{{ m.content }}{{ eos_token }}{%- endif %}{%- endfor %}"
)

FAMILIES = {"qwen2.5": QWEN25, "hermes": HERMES, "llama3.1": LLAMA31_JSON, "mistral": MISTRAL}
EXPECTED_PARSER = {"qwen2.5": "hermes", "hermes": "hermes", "llama3.1": "llama3_json", "mistral": "mistral"}
