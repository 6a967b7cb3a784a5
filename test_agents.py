"""Tests for the agents layer of bridge.py (section 8): tool calls read out of the model's text,
OpenAI function calling and Anthropic's Messages API.

(a) Pure unit tests of the section 8 helpers (no sockets). (b) End to end: a real bridge on
127.0.0.1:0 (test_bridge.Harness), a fake LMArena tab (test_bridge.FakeTab) and the official `openai`
and `anthropic` SDKs (every client: a timeout and max_retries=0).

Needs `anthropic>=0.40` (requirements-dev.txt); without it the Anthropic SDK tests are skipped.
Run: python -m unittest -v test_agents
"""
import base64
import json
import time
import unittest

import bridge
import openai
from bridge import ApiError
from bridge import (AnthropicEvents, StopSequenceFilter, ToolCallReader,
                    anthropic_error_body, anthropic_error_type, anthropic_message,
                    anthropic_stop_reason, count_input_tokens,
                    openai_message_tool_calls, openai_tool_call_delta,
                    parse_tools, tool_prompt)
from testsupport import BridgeCase, lines, MODEL_UUID, run_stop_filter

try:
    import anthropic
    try:                  # newer SDK releases ship their HTTP client as httpx2
        import httpx2 as httpx
    except ImportError:
        import httpx
except ImportError:       # listed in requirements-dev.txt; skipped (not failed) when missing
    anthropic = None


# (a) Pure unit tests ==================================================================================

NAMES = frozenset({"get_weather", "search"})
BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "Let me check <b>that</b>.\n" + BLOCK + "\nDone."
ANSWER_TEXT = "Let me check <b>that</b>.\n\nDone."


def run_reader(pieces, names=NAMES, **kw):
    """Feed pieces; return (joined text, calls, events)."""
    reader = ToolCallReader(names, **kw)
    events = []
    for piece in pieces:
        events += reader.feed(piece)
    events += reader.close()
    text = "".join(e[1] for e in events if e[0] == "text")
    calls = [e[1] for e in events if e[0] == "tool_call"]
    return text, calls, events


def weather_tools(**extra):
    return {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
        {"type": "function", "function": {"name": "search", "description": "Web search.",
                                          "parameters": {"type": "object"}}}], **extra}


def parse_sse(text):
    """Anthropic SSE text -> [(event line, data object)]; asserts the framing."""
    out = []
    assert text.endswith("\n\n"), text[-40:]
    for raw in text[:-2].split("\n\n"):
        lines = raw.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), raw
        out.append((lines[0][7:], json.loads(lines[1][6:])))
    return out


class ReaderTests(unittest.TestCase):

    def assertNoLeak(self, events, block=BLOCK):
        for kind, value in events:
            if kind == "text":
                self.assertNotIn("get_weather", value)
                self.assertNotIn("tool_call", value)

    def test_every_two_and_three_way_split(self):
        """Splitting the answer at every pair of positions gives the same text and call, no block text leaked."""
        want_text, want_calls, _ = run_reader([ANSWER])
        self.assertEqual(want_text, ANSWER_TEXT)
        self.assertEqual([(c["name"], c["arguments"]) for c in want_calls],
                         [("get_weather", '{"city":"Paris"}')])
        n = len(ANSWER)
        for i in range(n + 1):
            for j in range(i, n + 1):
                text, calls, events = run_reader([ANSWER[:i], ANSWER[i:j], ANSWER[j:]])
                self.assertEqual(text, want_text, (i, j))
                self.assertEqual([(c["name"], c["arguments"]) for c in calls],
                                 [("get_weather", '{"city":"Paris"}')], (i, j))
                self.assertNoLeak(events)

    def test_one_char_per_feed(self):
        """Feeding one character at a time gives the same result and never leaks a block character."""
        text, calls, events = run_reader(list(ANSWER))
        self.assertEqual(text, ANSWER_TEXT)
        self.assertEqual(len(calls), 1)
        self.assertNoLeak(events)

    def test_text_is_emitted_at_once_and_only_tag_prefix_is_held(self):
        """Text goes out at once; only a suffix that may start '<tool_call>' is held back."""
        reader = ToolCallReader(NAMES)
        self.assertEqual(reader.feed("Hello "), [("text", "Hello ")])
        self.assertEqual(reader.feed("a <tool_ca"), [("text", "a ")])
        self.assertEqual(reader.feed("ke> b"), [("text", "<tool_cake> b")])

    def test_lone_angle_bracket_released_on_next_char(self):
        """A '<' that does not start a block is released as soon as the next character rules it out."""
        reader = ToolCallReader(NAMES)
        self.assertEqual(reader.feed("x <"), [("text", "x ")])
        self.assertEqual(reader.feed("b"), [("text", "<b")])
        self.assertEqual(reader.feed("<"), [])
        self.assertEqual(reader.feed("<"), [("text", "<")])     # '<<': the first one is released
        self.assertEqual(reader.close(), [("text", "<")])

    def test_two_parallel_calls(self):
        """Two blocks give two calls with distinct call_<24 hex> ids, in order."""
        answer = (BLOCK + "\n<tool_call>\n" + '{"name": "search", "arguments": {"q": "rain"}}'
                  + "\n</tool_call>")
        text, calls, _ = run_reader([answer])
        self.assertEqual(text, "\n")
        self.assertEqual([c["name"] for c in calls], ["get_weather", "search"])
        self.assertEqual(calls[1]["arguments"], '{"q":"rain"}')
        for c in calls:
            self.assertRegex(c["id"], r"^call_[0-9a-f]{24}$")
        self.assertNotEqual(calls[0]["id"], calls[1]["id"])

    def test_parallel_false_keeps_only_first_call(self):
        """With parallel false the first valid call is kept and later valid blocks are dropped."""
        answer = "a" + BLOCK + "b" + BLOCK.replace("Paris", "Rome") + "c"
        reader = ToolCallReader(NAMES, parallel=False)
        events = reader.feed(answer) + reader.close()
        self.assertEqual([e for e in events if e[0] == "text"], [("text", "a"), ("text", "bc")])
        calls = [e[1] for e in events if e[0] == "tool_call"]
        self.assertEqual(len(calls), 1)
        self.assertIn("Paris", calls[0]["arguments"])
        self.assertTrue(reader.done)

    def test_json_fence_inside_block(self):
        """A ```json fence (or a bare ```) inside the block is accepted."""
        for fence in ("```json", "```", "```JSON"):
            answer = (f'<tool_call>\n{fence}\n{{"name": "search", "arguments": {{"q": "x"}}}}\n```\n'
                      "</tool_call>")
            text, calls, _ = run_reader([answer])
            self.assertEqual(text, "", fence)
            self.assertEqual(calls[0]["arguments"], '{"q":"x"}')

    def test_other_fence_stays_text(self):
        """A fence of another language is not a call."""
        answer = '<tool_call>```python\n{"name": "search", "arguments": {}}\n```</tool_call>'
        self.assertEqual(run_reader([answer])[:2], (answer, []))

    def test_arguments_as_json_string_and_aliases(self):
        """Arguments may be a JSON string, or spelled parameters/input, or missing."""
        cases = [('{"name": "search", "arguments": "{\\"q\\": \\"é\\"}"}', '{"q":"é"}'),
                 ('{"name": "search", "parameters": {"q": 1}}', '{"q":1}'),
                 ('{"name": "search", "input": {"q": [1, 2]}}', '{"q":[1,2]}'),
                 ('{"name": "search"}', "{}"),
                 ('{"name": "search", "arguments": ""}', "{}")]
        for inner, want in cases:
            text, calls, _ = run_reader([f"<tool_call>{inner}</tool_call>"])
            self.assertEqual((text, calls[0]["arguments"]), ("", want), inner)

    def test_unknown_tool_and_invalid_json_stay_text(self):
        """A block naming an unknown tool, holding invalid JSON, or non-object arguments stays text verbatim."""
        bad = ['<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>',
               '<tool_call>\n{"name": "search", "arguments": {"q": }\n</tool_call>',
               '<tool_call>{"name": "search", "arguments": [1]}</tool_call>',
               '<tool_call>{"name": "search", "arguments": "not json"}</tool_call>',
               '<tool_call>{"name": "search", "arguments": {"x": NaN}}</tool_call>',
               '<tool_call>["search"]</tool_call>']
        for block in bad:
            answer = "before " + block + " after"
            for pieces in ([answer], list(answer)):
                text, calls, _ = run_reader(pieces)
                self.assertEqual((text, calls), (answer, []), block)

    def test_text_before_between_and_after_blocks(self):
        """Text around and between blocks is kept in order."""
        answer = "one " + BLOCK + " two " + BLOCK + " three"
        text, calls, events = run_reader([answer])
        self.assertEqual(text, "one  two  three")
        self.assertEqual([e[0] for e in events], ["text", "tool_call", "text", "tool_call", "text"])

    def test_unterminated_block_is_text_at_close(self):
        """A block still open at close() is emitted as text."""
        answer = 'Sure. <tool_call>\n{"name": "search", "arguments": {"q"'
        for pieces in ([answer], list(answer)):
            text, calls, _ = run_reader(pieces)
            self.assertEqual((text, calls), (answer, []))

    def test_new_block_before_close_abandons_first(self):
        """A '<tool_call>' inside an open block makes the first one text and starts a new block."""
        first = '<tool_call>{"name": "search", "arguments": {}}\n'
        answer = first + BLOCK
        for pieces in ([answer], list(answer)):
            text, calls, _ = run_reader(pieces)
            self.assertEqual(text, first)
            self.assertEqual([c["name"] for c in calls], ["get_weather"])

    def test_split_close_tag(self):
        """A closing tag split across feeds is found."""
        head = '<tool_call>{"name": "search", "arguments": {"q": "</tool"}}</tool_'
        text, calls, _ = run_reader([head, "call>x"])
        self.assertEqual((text, calls[0]["arguments"]), ("x", '{"q":"</tool"}'))

    def test_custom_id_prefix(self):
        """id_prefix sets the call ids' prefix (toolu_ for Anthropic)."""
        _, calls, _ = run_reader([BLOCK], id_prefix="toolu_")
        self.assertRegex(calls[0]["id"], r"^toolu_[0-9a-f]{24}$")

    def test_long_block_in_small_chunks_is_linear(self):
        """An argument streamed 4 characters at a time is read in time linear in its size: 8 times
        the size costs about 8 times as much (quadratic: 64 times), whatever the machine's speed."""
        def cost(size):
            big = "x" * size
            answer = '<tool_call>{"name": "search", "arguments": {"q": "' + big + '"}}</tool_call>'
            pieces = [answer[i:i + 4] for i in range(0, len(answer), 4)]
            best = float("inf")
            for _ in range(2):
                started = time.perf_counter()
                text, calls, _ = run_reader(pieces)
                best = min(best, time.perf_counter() - started)
            self.assertEqual(json.loads(calls[0]["arguments"])["q"], big)
            return best
        small, large = cost(50_000), cost(400_000)
        self.assertLess(large / small, 24, (small, large))


class ParseToolsTests(unittest.TestCase):

    def assertBad(self, data, field):
        with self.assertRaises(ApiError) as cm:
            parse_tools(data)
        self.assertEqual(cm.exception.status, 400)
        self.assertEqual(cm.exception.code, "invalid_request_error")
        self.assertIn(field, cm.exception.message)

    def test_valid_tools(self):
        """Valid tools give a frozen ToolSpec with auto choice and parallel on."""
        spec = parse_tools(weather_tools())
        self.assertEqual(spec.choice, "auto")
        self.assertTrue(spec.parallel)
        self.assertEqual(spec.names, frozenset({"get_weather", "search"}))
        self.assertEqual(spec.tools[0][0:2], ("get_weather", "Current weather for a city."))
        with self.assertRaises(Exception):
            spec.choice = "required"

    def test_no_tools_or_none_choice_gives_none(self):
        """No tools, empty tools, or tool_choice none give None."""
        self.assertIsNone(parse_tools({}))
        self.assertIsNone(parse_tools({"tools": []}))
        self.assertIsNone(parse_tools({"tools": None, "tool_choice": "auto"}))
        self.assertIsNone(parse_tools(weather_tools(tool_choice="none")))
        self.assertIsNone(parse_tools(weather_tools(function_call="none")))

    def test_choices(self):
        """tool_choice required / named / legacy function_call / parallel_tool_calls are read."""
        self.assertEqual(parse_tools(weather_tools(tool_choice="required")).choice, "required")
        named = {"type": "function", "function": {"name": "search"}}
        self.assertEqual(parse_tools(weather_tools(tool_choice=named)).choice, "search")
        self.assertEqual(parse_tools(weather_tools(tool_choice={"type": "function", "name": "search"})).choice,
                         "search")
        self.assertEqual(parse_tools(weather_tools(function_call={"name": "get_weather"})).choice,
                         "get_weather")
        self.assertFalse(parse_tools(weather_tools(parallel_tool_calls=False)).parallel)

    def test_legacy_functions(self):
        """The legacy 'functions' list is accepted; parameters default to an empty object schema."""
        spec = parse_tools({"functions": [{"name": "ping"}]})
        self.assertEqual(spec.tools, (bridge.Tool("ping", "", {"type": "object", "properties": {}}),))

    def test_bad_shapes_name_the_field(self):
        """Bad shapes give 400 naming the offending field."""
        self.assertBad({"tools": {}}, "tools")
        self.assertBad({"tools": ["x"]}, "tools[0]")
        self.assertBad({"tools": [{"type": "code_interpreter"}]}, "tools[0].type")
        self.assertBad({"tools": [{"type": "function"}]}, "tools[0].function")
        self.assertBad({"tools": [{"type": "function", "function": {"name": "a b"}}]},
                       "tools[0].function.name")
        self.assertBad({"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
                       "tools[0].function.name")
        self.assertBad({"tools": [{"type": "function", "function": {"name": 3}}]},
                       "tools[0].function.name")
        self.assertBad({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]},
                       "tools[0].function.parameters")
        self.assertBad({"tools": [{"type": "function", "function": {"name": "a", "description": 1}}]},
                       "tools[0].function.description")
        self.assertBad({"functions": [{"name": "a"}, {"name": "a"}]}, "two functions named 'a'")
        self.assertBad(weather_tools(parallel_tool_calls="yes"), "parallel_tool_calls")
        self.assertBad(weather_tools(tool_choice="always"), "tool_choice")
        self.assertBad(weather_tools(tool_choice=3), "tool_choice")
        self.assertBad(weather_tools(tool_choice={"type": "function"}), "tool_choice.function")
        self.assertBad(weather_tools(tool_choice={"type": "x", "function": {"name": "search"}}),
                       "tool_choice.type")

    def test_named_choice_must_exist(self):
        """A named tool_choice (or function_call) naming an unknown function is a 400."""
        self.assertBad(weather_tools(tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice.function.name")
        self.assertBad(weather_tools(function_call={"name": "nope"}), "function_call.name")
        self.assertBad({"tool_choice": "required"}, "tool_choice")

    def test_name_pattern_allows_dots_and_dashes(self):
        """Names may hold letters, digits, '_', '.', '-' up to 64 characters."""
        spec = parse_tools({"tools": [{"type": "function", "function": {"name": "mcp.fs-read_" + "x" * 52}}]})
        self.assertEqual(len(next(iter(spec.names))), 64)


class PromptTests(unittest.TestCase):

    def test_prompt_lists_tools_and_format(self):
        """The prompt lists each tool with its arguments one per line and the exact call format."""
        text = tool_prompt(parse_tools(weather_tools()))
        self.assertIn("## get_weather\nCurrent weather for a city.\nArguments:\n- city (string, required)\n", text)
        self.assertIn("## search\nWeb search.\nArguments: none ({}).", text)
        self.assertIn('<tool_call>\n{"name": "<tool name>", "arguments": {...}}\n</tool_call>', text)
        self.assertIn("several blocks", text)
        self.assertIn("when it helps", text)

    def test_schema_lines_keep_every_fact(self):
        """Every parameter, type, enum, default, bound and required flag stays, nested objects and
        arrays indented, $ref resolved; validator noise ($schema, additionalProperties) goes."""
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                  "additionalProperties": False, "required": ["path", "mode"],
                  "$defs": {"Pos": {"type": "object", "description": "A place.", "properties": {
                      "line": {"type": "integer", "minimum": 1}}, "required": ["line"]}},
                  "properties": {
                      "path": {"type": "string", "description": "Where\n  to   write."},
                      "mode": {"type": "string", "enum": ["a", "w"], "default": "w"},
                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                      "at": {"$ref": "#/$defs/Pos"},
                      "edits": {"type": "array", "items": {"type": "object", "properties": {
                          "old": {"type": "string"}, "new": {"type": ["string", "null"]}}, "required": ["old"]}},
                      "opt": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
        self.assertEqual(bridge.schema_lines(schema), [
            "- path (string, required): Where to write.",
            '- mode (string, required): one of "a", "w"; default "w"',
            "- tags (array of string): max items 3",
            "- at (object): A place.",
            "  - line (integer, required): min 1",
            "- edits (array of object)",
            "  - old (string, required)",
            "  - new (string or null)",
            "- opt (one of: string | null)"])
        text = tool_prompt(bridge.tool_spec([bridge.Tool("w", "Write.", schema)], "auto", True))
        self.assertNotIn("$schema", text)
        self.assertNotIn("additionalProperties", text)

    def test_schema_lines_bounded_for_refs_that_fan_out(self):
        """A few hundred bytes of $refs pointing at themselves (or fanning out level by level) made
        billions of lines on the event loop; a $ref is not expanded inside itself, and all the tools
        of a request share one budget of characters."""
        def fan(n):
            return {"type": "object", "$defs": {"A": {"type": "object", "properties": {
                f"p{i}": {"$ref": "#/$defs/A"} for i in range(n)}}},
                "properties": {f"q{i}": {"$ref": "#/$defs/A"} for i in range(n)}}
        self.assertEqual(len(bridge.schema_lines(fan(4))), 4 * 5)     # was 4 + 4**2 + ... + 4**9
        levels = {f"D{k}": {"type": "object", "properties": {f"p{i}": {"$ref": f"#/$defs/D{k + 1}"}
                                                                for i in range(10)}} for k in range(9)}
        dag = {"type": "object", "$defs": levels, "properties": {f"q{i}": {"$ref": "#/$defs/D0"} for i in range(10)}}
        tools = [bridge.Tool(f"t{i}", "", dag) for i in range(50)]
        text = tool_prompt(bridge.tool_spec(tools, "auto", True))
        self.assertLess(len(text), 2 * bridge.SCHEMA_MAX_CHARS)
        self.assertIn("too large to describe in full", text)

    def test_schema_lines_take_odd_schemas(self):
        """$defs that is not an object, a $ref to a non-object, `required` holding non-strings: the
        request was a 500 (TypeError, AttributeError); now the odd parts are left out."""
        for schema in ({"properties": {"a": {"$ref": "#/$defs/X"}}, "$defs": [1]},
                       {"properties": {"a": {"$ref": "#/$defs/X"}}, "definitions": "abc"},
                       {"properties": {"a": {"$ref": "#/$defs/X"}}, "$defs": {"X": 5}},
                       {"properties": {"a": {}}, "required": [[1], {"a": 1}, "a"]}):
            self.assertEqual(bridge.schema_lines(schema)[0][:5], "- a (", schema)
        self.assertEqual(bridge.schema_lines({"properties": {"a": {}}, "required": [[1], "a"]}),
                         ["- a (any, required)"])

    def test_prompt_choice_wording(self):
        """Required, named and non-parallel choices are spelled out."""
        self.assertIn("MUST call at least one tool",
                      tool_prompt(parse_tools(weather_tools(tool_choice="required"))))
        named = weather_tools(tool_choice={"type": "function", "function": {"name": "search"}})
        self.assertIn('MUST call the tool "search"', tool_prompt(parse_tools(named)))
        self.assertIn("at most one tool per answer",
                      tool_prompt(parse_tools(weather_tools(parallel_tool_calls=False))))

    def test_example_answer_following_prompt_is_read(self):
        """A block written exactly as the prompt shows is read by the reader."""
        spec = parse_tools(weather_tools())
        example = '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
        _, calls, _ = run_reader([example], names=spec.names)
        self.assertEqual(calls[0]["name"], "search")


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and news?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "No news."}]},
    {"role": "user", "content": "Thanks"},
]


def history(messages):
    """OpenAI messages -> the transcript templates the bridge sends."""
    return bridge.transcript(bridge.openai_turns(messages, bridge.Attachments(2**20)))


def plain(text, role="user"):
    return {"role": role, "content": text, "attachments": []}


class HistoryTests(unittest.TestCase):

    def test_calls_and_results_become_text(self):
        """Assistant tool_calls become blocks in its text; results become one user message naming the calls."""
        out = history(HISTORY)
        self.assertEqual(out[0], plain("Be brief.", "system"))
        self.assertEqual(out[1], plain("Weather in Paris and news?"))
        self.assertEqual(out[2], plain('Checking.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                                       '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "search", '
                                       '"arguments": {}}\n</tool_call>', "assistant"))
        self.assertEqual(out[3], plain('<tool_result name="get_weather" id="call_1">\nSunny, 21 C\n'
                                       '</tool_result>\n<tool_result name="search" id="call_2">\nNo news.\n'
                                       '</tool_result>'))
        self.assertEqual(out[4], plain("Thanks"))
        self.assertEqual(len(out), 5)

    def test_history_blocks_read_back_by_reader(self):
        """The assistant text made from tool_calls is read back as the same calls."""
        text = history(HISTORY)[2]["content"]
        got, calls, _ = run_reader([text])
        self.assertEqual(got, "Checking.\n\n\n")
        self.assertEqual([(c["name"], c["arguments"]) for c in calls],
                         [("get_weather", '{"city":"Paris"}'), ("search", "{}")])

    def test_legacy_function_messages(self):
        """Legacy function_call and role function messages are converted too."""
        out = history([
            {"role": "assistant", "content": None,
             "function_call": {"name": "search", "arguments": '{"q": "a"}'}},
            {"role": "function", "name": "search", "content": "found"}])
        self.assertEqual(out[0]["content"],
                         '<tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>')
        self.assertEqual(out[1], plain('<tool_result name="search">\nfound\n</tool_result>'))

    def test_unknown_id_and_image_parts(self):
        """A result for an unknown id names only the id; its image is an attachment of that turn."""
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        out = history([{"role": "tool", "tool_call_id": 'x"1',
                        "content": [{"type": "text", "text": "see"}, image]}])
        self.assertEqual(out[0]["content"], '<tool_result id="x&quot;1">\nsee\n</tool_result>')
        self.assertEqual([a["contentType"] for a in out[0]["attachments"]], ["image/png"])

    def test_invalid_arguments_shown_as_string(self):
        """Arguments that are not JSON are shown to the model as a JSON string."""
        out = history([{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{oops"}}]}])
        self.assertIn('"arguments": "{oops"', out[0]["content"])

    def test_shape_errors_name_the_field(self):
        """Bad history shapes give 400 naming the field."""
        cases = [
            ("x", "'messages'"),
            ([1], "messages[0]"),
            ([{"role": "user"}, {"role": "assistant", "tool_calls": {}}], "messages[1].tool_calls"),
            ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {}}}]}],
             "'messages[0].tool_calls[0].function.arguments' must be a string"),
            ([{"role": "assistant", "tool_calls": [{"id": "a"}]}], "messages[0].tool_calls[0].function"),
            ([{"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "f"}}]}],
             "messages[0].tool_calls[0].id"),
            ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
             "messages[0].tool_calls[0].function.name"),
            ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
            ([{"role": "tool", "tool_call_id": "a", "content": 5}], "messages[0].content"),
            ([{"role": "function", "content": "x"}], "messages[0].name"),
        ]
        for messages, field in cases:
            with self.assertRaises(ApiError) as cm:
                bridge.openai_conversation({"model": "m", "messages": messages}, bridge.Config())
            self.assertEqual(cm.exception.status, 400)
            self.assertIn(field, cm.exception.message)


class OpenAIOutputTests(unittest.TestCase):
    CALL = {"id": "call_abc", "name": "search", "arguments": '{"q":"x"}'}

    def test_stream_deltas(self):
        """One call gives an id+name delta and then an arguments delta."""
        self.assertEqual(openai_tool_call_delta(1, self.CALL), [
            {"index": 1, "id": "call_abc", "type": "function",
             "function": {"name": "search", "arguments": ""}},
            {"index": 1, "function": {"arguments": '{"q":"x"}'}}])

    def test_stream_chunks_with_bridge_formatter(self):
        """The SSE chunks built on a ChunkFormatter parse as chat.completion.chunk with tool_calls."""
        reply = bridge.OpenAIReply("m", True, False, 0)
        text = reply.fmt_call(0, self.CALL)
        chunks = [json.loads(line[6:]) for line in text.split("\n\n") if line]
        self.assertEqual(len(chunks), 2)
        for chunk in chunks:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertIsNone(chunk["choices"][0]["finish_reason"])
        self.assertEqual(chunks[0]["choices"][0]["delta"]["tool_calls"][0]["id"], "call_abc")
        self.assertEqual(chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
                         '{"q":"x"}')

    def test_message_tool_calls(self):
        """Non-streaming message.tool_calls has id, type function, name and arguments text."""
        self.assertEqual(openai_message_tool_calls([self.CALL]), [
            {"id": "call_abc", "type": "function", "function": {"name": "search", "arguments": '{"q":"x"}'}}])


PNG = "iVBORw0KGgo="


def anthropic_body(**extra):
    body = {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
    body.update(extra)
    return body


def convert(body, **kw):
    """A /v1/messages body -> (the Conversation, its transcript templates)."""
    conv = bridge.anthropic_conversation(body, bridge.Config(), **kw)
    return conv, bridge.transcript(conv.turns)


class AnthropicRequestTests(unittest.TestCase):

    def assertBad(self, body, field, **kw):
        with self.assertRaises(ApiError) as cm:
            convert(body, **kw)
        self.assertEqual(cm.exception.status, 400)
        self.assertEqual(cm.exception.code, "invalid_request_error")
        self.assertIn(field, cm.exception.message)

    def test_minimal(self):
        """A minimal request keeps model, stream false and one user turn."""
        conv, templates = convert(anthropic_body())
        self.assertEqual((conv.model, conv.stream, conv.tools, conv.stop), ("claude-x", False, None, ()))
        self.assertEqual(templates, [plain("Hi")])

    def test_system_string_and_blocks(self):
        """A system string or list of text blocks becomes one system turn, first."""
        _, out = convert(anthropic_body(system="Be nice."))
        self.assertEqual(out[0], plain("Be nice.", "system"))
        _, out = convert(anthropic_body(system=[
            {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "B"}]))
        self.assertEqual(out[0], plain("A\n\nB", "system"))

    def test_mid_conversation_system_kept_in_order(self):
        """Claude Code 2.x (beta mid-conversation-system) puts system entries between turns: each is
        an instruction at that point of the conversation, kept there in the folded transcript."""
        _, out = convert(anthropic_body(system="Top.", messages=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            {"role": "system", "content": "Now be terse."},
            {"role": "system", "content": [{"type": "text", "text": "And polite.", "cache_control": {}}]},
            {"role": "user", "content": "three"}]))
        self.assertEqual([(t["role"], t["content"]) for t in out], [
            ("system", "Top."), ("user", "one"), ("assistant", "two"), ("system", "Now be terse."),
            ("system", "And polite."), ("user", "three")])
        content, _ = bridge.fold_turns(out)
        self.assertLess(content.index("two"), content.index("<system>\nNow be terse.\n</system>"))
        self.assertLess(content.index("Now be terse."), content.index("three"))

    def test_every_user_block_type(self):
        """Text, image (base64 and url) and document (pdf, text, content) blocks: texts in order,
        images and files as attachments."""
        _, out = convert(anthropic_body(messages=[{"role": "user", "content": [
            {"type": "text", "text": "Look"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": "JVBERi0="}, "title": "Report"},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": "JVBERi0="}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain"},
             "title": "Notes"},
            {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "c1"}]}},
            {"type": "search_result", "title": "T", "source": "https://s", "content": [
                {"type": "text", "text": "found"}]},
        ]}]))
        self.assertEqual(out[0]["content"], "Look\n\nNotes\n\nplain\n\nc1\n\nT\nhttps://s\nfound")
        files = out[0]["attachments"]
        self.assertEqual([(f["name"], f["contentType"]) for f in files], [
            ("image_1.png", "image/png"), ("a.jpg", "image/jpeg"), ("Report.pdf", "application/pdf"),
            ("document_2.pdf", "application/pdf")])
        self.assertEqual(files[0]["url"], f"data:image/png;base64,{PNG}")

    def test_tool_use_and_results_and_thinking(self):
        """tool_use -> calls, tool_result -> results first (is_error prefixed, named after the call),
        thinking (with signatures) and server-tool blocks dropped."""
        _, out = convert(anthropic_body(messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "redacted_thinking", "data": "zz"},
                {"type": "text", "text": "Checking."},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "search", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "boom"},
                             {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                          "data": PNG}}]},
                {"type": "text", "text": "And?"}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": ""}]},
        ]))
        self.assertEqual([t["role"] for t in out], ["user", "assistant", "user", "user"])
        self.assertEqual(out[1]["content"],
                         'Checking.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>')
        self.assertEqual(out[2]["content"],
                         '<tool_result name="get_weather" id="toolu_1">\nSunny\n</tool_result>\n'
                         '<tool_result name="search" id="toolu_2">\nError: boom\n</tool_result>')
        self.assertEqual(len(out[2]["attachments"]), 1)
        self.assertEqual(out[3], plain("And?"))

    def test_tools_choice_stop_stream(self):
        """tools, every tool_choice type, disable_parallel_tool_use, stop_sequences and stream convert;
        server tools are left out (agents offer them whatever the endpoint), never a 400."""
        tools = [{"name": "get_weather", "description": "W", "input_schema": {"type": "object"}},
                 {"type": "custom", "name": "search", "input_schema": {"type": "object"}},
                 {"type": "web_search_20250305", "name": "web_search"}]
        conv, _ = convert(anthropic_body(tools=tools, stream=True, stop_sequences=["END", ""],
                                         tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                         temperature=0.2, top_k=3, metadata={"user_id": "u"},
                                         thinking={"type": "enabled", "budget_tokens": 1024},
                                         context_management={"edits": []}, output_config={"effort": "high"}))
        spec = conv.tools
        self.assertEqual(spec.tools[0], bridge.Tool("get_weather", "W", {"type": "object"}))
        self.assertEqual(spec.names, {"get_weather", "search"})
        self.assertEqual((spec.choice, spec.parallel), ("required", False))
        self.assertEqual(conv.stop, ("END",))
        self.assertIs(conv.stream, True)
        for choice, want in (({"type": "auto"}, "auto"), ({"type": "tool", "name": "search"}, "search")):
            self.assertEqual(convert(anthropic_body(tools=tools, tool_choice=choice))[0].tools.choice, want)
        self.assertIsNone(convert(anthropic_body(tools=tools, tool_choice={"type": "none"}))[0].tools)

    def test_errors_name_the_field(self):
        """Bad requests give 400 naming the Anthropic field."""
        self.assertBad({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}, "model")
        self.assertBad({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens")
        self.assertBad(anthropic_body(max_tokens=0), "max_tokens")
        self.assertBad(anthropic_body(max_tokens=True), "max_tokens")
        self.assertBad(anthropic_body(messages=[]), "messages")
        self.assertBad(anthropic_body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role")
        self.assertBad(anthropic_body(messages=[{"role": "system", "content": 3}]), "messages.0.content")
        self.assertBad(anthropic_body(messages=[{"role": "user", "content": 3}]), "messages.0.content")
        self.assertBad(anthropic_body(messages=[{"role": "user", "content": [{"type": "video"}]}]),
                       "messages.0.content.0.type")
        self.assertBad(anthropic_body(messages=[{"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "a"}]}]), "messages.0.content.0.type")
        self.assertBad(anthropic_body(messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]),
            "messages.0.content.0.source.type")
        self.assertBad(anthropic_body(messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}]}]),
            "messages.0.content.0.source.type")
        self.assertBad(anthropic_body(messages=[{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "n", "input": []}]}]), "messages.0.content.0.input")
        self.assertBad(anthropic_body(messages=[{"role": "user", "content": [
            {"type": "tool_result", "content": "x"}]}]), "messages.0.content.0.tool_use_id")
        self.assertBad(anthropic_body(system=5), "system")
        self.assertBad(anthropic_body(stream="yes"), "stream")
        self.assertBad(anthropic_body(tools=[{"name": "a b", "input_schema": {}}]), "tools.0.name")
        self.assertBad(anthropic_body(tools=[{"name": "a"}]), "tools.0.input_schema")
        self.assertBad(anthropic_body(tools=[{"name": "a", "input_schema": {}}],
                                      tool_choice={"type": "tool", "name": "b"}), "tool_choice.name")
        self.assertBad(anthropic_body(tool_choice={"type": "sometimes"}), "tool_choice.type")
        self.assertBad(anthropic_body(stop_sequences="END"), "stop_sequences")

    def test_unhashable_types_are_400_not_500(self):
        """A block or tool_choice whose type is an array (or a tool_choice name that is an object)
        was looked up in a set: TypeError, a 500 with OpenAI's error shape."""
        self.assertBad(anthropic_body(messages=[{"role": "assistant", "content": [{"type": []}]}]),
                       "messages.0.content.0.type")
        self.assertBad(anthropic_body(tools=[{"name": "a", "input_schema": {}}], tool_choice={"type": []}),
                       "tool_choice.type")
        for data in ({"tools": [{"type": "function", "function": {"name": "f"}}],
                      "tool_choice": {"type": "function", "function": {"name": ["f"]}}},
                     {"functions": [{"name": "f"}], "function_call": {"name": {}}}):
            with self.assertRaises(ApiError) as cm:
                parse_tools(data)
            self.assertEqual(cm.exception.status, 400)

    def test_count_tokens_body_without_max_tokens(self):
        """count_input_tokens needs no max_tokens and grows with tools and images."""
        cfg = bridge.Config()
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
        base = count_input_tokens(body, cfg)
        self.assertEqual(base, 100)
        with_tools = count_input_tokens({**body, "tools": [{"name": "a", "input_schema": {"type": "object"}}]}, cfg)
        self.assertGreater(with_tools, base + 50)
        with_image = count_input_tokens({**body, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x" * 400},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]}, cfg)
        self.assertEqual(with_image, base + bridge._ATTACHMENT_TOKENS)
        with self.assertRaises(ApiError):
            count_input_tokens({"messages": []}, cfg)


class AnthropicOutputTests(unittest.TestCase):

    def test_error_types(self):
        """HTTP statuses map to Anthropic error types and the error body shape."""
        want = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 502: "api_error", 504: "api_error", 503: "api_error",
                529: "overloaded_error", 408: "invalid_request_error", 501: "api_error"}
        for status, kind in want.items():
            self.assertEqual(anthropic_error_type(status), kind, status)
        self.assertEqual(anthropic_error_body(ApiError(429, "slow down", "rate_limited")),
                         {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})

    def test_stop_reasons(self):
        """OpenAI finish reasons map to Anthropic stop reasons; a hit stop sequence wins."""
        for finish, want in (("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
                             ("content_filter", "end_turn"), (None, "end_turn")):
            self.assertEqual(anthropic_stop_reason(finish), want)
        self.assertEqual(anthropic_stop_reason("stop", "END"), "stop_sequence")

    def test_events_render_and_parse_back(self):
        """A thinking+text+tool_use stream renders valid SSE whose data type repeats the event line."""
        ev = AnthropicEvents("msg_1", "claude-x", 12)
        call = {"id": "call_" + "a" * 24, "name": "search", "arguments": '{"q":"x"}'}
        text = (ev.start() + ev.ping() + ev.thinking("Let me ") + ev.thinking("think.")
                + ev.text("") + ev.text("Hello") + ev.text(" there") + ev.tool_use(call)
                + ev.text("after") + ev.finish("tool_use", None, 7))
        events = parse_sse(text)
        for name, data in events:
            self.assertEqual(name, data["type"])
        self.assertEqual([n for n, _ in events], [
            "message_start", "ping",
            "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_stop",
            "message_delta", "message_stop"])
        start = events[0][1]["message"]
        self.assertEqual(start, {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                                 "content": [], "stop_reason": None, "stop_sequence": None,
                                 "usage": {"input_tokens": 12, "output_tokens": 0}})
        self.assertEqual(events[2][1]["content_block"], {"type": "thinking", "thinking": "", "signature": ""})
        self.assertEqual(events[3][1]["delta"], {"type": "thinking_delta", "thinking": "Let me "})
        self.assertEqual(events[6][1]["content_block"], {"type": "text", "text": ""})
        self.assertEqual(events[8][1]["delta"], {"type": "text_delta", "text": " there"})
        self.assertEqual(events[10][1]["content_block"], {"type": "tool_use", "id": "toolu_" + "a" * 24,
                                                          "name": "search", "input": {}})
        self.assertEqual(events[11][1]["delta"], {"type": "input_json_delta", "partial_json": '{"q":"x"}'})
        indexes = [d["index"] for _, d in events if "index" in d]
        self.assertEqual(indexes, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3])
        self.assertEqual(events[-2][1], {"type": "message_delta",
                                         "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                         "usage": {"output_tokens": 7}})

    def test_text_then_thinking_reopens(self):
        """Thinking after text closes the text block and opens a new one."""
        ev = AnthropicEvents("msg_1", "m", 0)
        events = parse_sse(ev.text("a") + ev.thinking("b") + ev.finish("end_turn", None, 1))
        starts = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
        stops = [d["index"] for n, d in events if n == "content_block_stop"]
        self.assertEqual((starts, stops), ([(0, "text"), (1, "thinking")], [0, 1]))

    def test_error_and_empty_finish(self):
        """error() renders an error event; finish without blocks has no block stop."""
        events = parse_sse(AnthropicEvents.error(ApiError(503, "no tab", "no_tab_connected")))
        self.assertEqual(events, [("error", {"type": "error", "error": {"type": "api_error",
                                                                        "message": "no tab"}})])
        ev = AnthropicEvents("m", "m", 1)
        events = parse_sse(ev.start() + ev.finish("end_turn", None, 0))
        self.assertEqual([n for n, _ in events], ["message_start", "message_delta", "message_stop"])

    def test_non_streaming_message(self):
        """The non-streaming body orders thinking, text, tool_use, with input parsed."""
        body = anthropic_message("msg_1", "m", "Hi", "hmm",
                                 [{"id": "toolu_x", "name": "search", "arguments": '{"q":"é"}'}],
                                 "tool_use", None, 3, 4)
        self.assertEqual(body, {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                "content": [{"type": "thinking", "thinking": "hmm", "signature": ""},
                                            {"type": "text", "text": "Hi"},
                                            {"type": "tool_use", "id": "toolu_x", "name": "search",
                                             "input": {"q": "é"}}],
                                "stop_reason": "tool_use", "stop_sequence": None,
                                "usage": {"input_tokens": 3, "output_tokens": 4}})
        self.assertEqual(anthropic_message("i", "m", "", "", [], "end_turn", None, 0, 0)["content"], [])


class StopSequenceTests(unittest.TestCase):

    def run_filter(self, pieces, stops):
        return run_stop_filter(pieces, stops)

    def test_every_split(self):
        """Splitting at every pair of positions gives the same cut text and hit."""
        text = "Hello wor<ld. The END is near. STOP here"
        stops = ["END", "STOP", "Xyz"]
        want = ("Hello wor<ld. The ", ["END"])
        self.assertEqual(self.run_filter([text], stops), want)
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                self.assertEqual(self.run_filter([text[:i], text[i:j], text[j:]], stops), want, (i, j))

    def test_no_hit_every_split(self):
        """Without a hit every character comes out, however split."""
        text = "almost EN and STO but no"
        for i in range(len(text) + 1):
            self.assertEqual(self.run_filter([text[:i], text[i:]], ["END", "STOP"]), (text, []))

    def test_holds_only_possible_prefix(self):
        """Only a suffix that may start a stop sequence is held back."""
        f = StopSequenceFilter(["END"])
        self.assertEqual(f.feed("abc E"), ("abc ", None))
        self.assertEqual(f.feed("x"), ("Ex", None))
        self.assertEqual(f.feed("EN"), ("", None))
        self.assertEqual(f.feed("D tail"), ("", "END"))
        self.assertEqual(f.feed("more"), ("", None))
        self.assertEqual(f.close(), "")
        self.assertEqual(f.hit, "END")

    def test_earliest_end_wins(self):
        """Of overlapping stops, the one that ends first wins (as a model stopping token by token)."""
        for pieces in (["abcd"], ["ab", "cd"], list("abcd")):
            self.assertEqual(self.run_filter(pieces, ["abcd", "bc"]), ("a", ["bc"]))
            self.assertEqual(self.run_filter(pieces, ["bc", "abc"]), ("", ["abc"]))

    def test_no_stops_passes_through(self):
        """With no stop sequences, text passes straight through."""
        self.assertEqual(self.run_filter(["a", "b"], None), ("ab", []))
        self.assertEqual(self.run_filter(["a", "b"], [""]), ("ab", []))


@unittest.skipIf(anthropic is None, "the anthropic SDK is not installed")
class AnthropicSdkTests(unittest.TestCase):

    def client(self, handler):
        return anthropic.Anthropic(api_key="k", base_url="http://bridge.test",
                                   http_client=httpx.Client(transport=httpx.MockTransport(handler)))

    def test_sdk_parses_stream(self):
        """The official SDK's stream accumulator rebuilds the message our events describe."""
        ev = AnthropicEvents("msg_1", "claude-x", 12)
        reader = ToolCallReader(NAMES, "toolu_")
        sse = ev.start() + ev.ping()
        sse += ev.thinking("Pondering.")
        for kind, value in reader.feed("I'll check.\n" + BLOCK) + reader.close():
            sse += ev.text(value) if kind == "text" else ev.tool_use(value)
        sse += ev.finish("tool_use", None, 9)

        def handler(request):
            body = json.loads(request.content)
            self.assertTrue(body["stream"])
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse.encode())

        with self.client(handler).messages.stream(model="claude-x", max_tokens=10,
                                                  messages=[{"role": "user", "content": "hi"}]) as stream:
            texts = list(stream.text_stream)
            message = stream.get_final_message()
        self.assertEqual("".join(texts), "I'll check.\n")
        self.assertEqual([b.type for b in message.content], ["thinking", "text", "tool_use"])
        self.assertEqual(message.content[0].thinking, "Pondering.")
        self.assertEqual(message.content[2].name, "get_weather")
        self.assertEqual(message.content[2].input, {"city": "Paris"})
        self.assertEqual((message.stop_reason, message.usage.input_tokens, message.usage.output_tokens),
                         ("tool_use", 12, 9))

    def test_sdk_parses_message_and_error(self):
        """The SDK parses the non-streaming body and maps our error body to its exception."""
        body = anthropic_message("msg_1", "m", "Hi", "", [{"id": "toolu_1", "name": "search",
                                                           "arguments": "{}"}], "tool_use", None, 1, 2)
        client = self.client(lambda request: httpx.Response(200, json=body))
        message = client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        self.assertEqual(message.content[1].input, {})
        err = anthropic_error_body(ApiError(429, "slow", "rate_limited"))
        client = self.client(lambda request: httpx.Response(429, json=err))
        client = client.with_options(max_retries=0)
        with self.assertRaises(anthropic.RateLimitError) as cm:
            client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        self.assertIn("slow", str(cm.exception))

    def test_sdk_stream_error_event(self):
        """An error event mid-stream raises the SDK's API error."""
        ev = AnthropicEvents("msg_1", "m", 1)
        sse = ev.start() + ev.text("partial") + ev.error(ApiError(502, "tab gone", "tab_disconnected"))
        client = self.client(lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=sse.encode()))
        with self.assertRaises(anthropic.APIStatusError) as cm:
            with client.messages.stream(model="m", max_tokens=5,
                                        messages=[{"role": "user", "content": "x"}]) as stream:
                for _ in stream:
                    pass
        self.assertIn("tab gone", str(cm.exception))



# (b) End to end: a real bridge, a fake tab, the official SDKs ==========================================

SPLIT_ANSWER = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SEARCH_BLOCK = '<tool_call>\n{"name": "search", "arguments": {"q": "rain"}}\n</tool_call>'
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "City name."}},
                  "required": ["city"]}
SEARCH_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                      "parameters": SEARCH_SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Current weather for a city.",
                    "input_schema": WEATHER_SCHEMA},
                   {"name": "search", "description": "Search the web.", "input_schema": SEARCH_SCHEMA}]
TOOL_RESULT = "Sunny, 21 C"
FINAL = "It is sunny in Paris (21 C)."
QUESTION = "What's the weather in Paris?"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


def answer(*texts, finish="stop"):
    """A whole LMArena answer: text rows, a finish row, [DONE]."""
    return lines(*texts, finish=finish) + ["[DONE]"]


def prompt_of(task):
    """The text the bridge sent to LMArena for one task (create mode)."""
    return task["payload"]["request"]["body"]["userMessage"]["content"]


def path_of(task):
    return task["payload"]["request"]["path"]


def agent_script(msg):
    """The fake model of an agent loop: a tool call first, the final answer once the result is in the prompt."""
    if TOOL_RESULT in prompt_of(msg):
        return answer(FINAL)
    return answer("Let me check.", BLOCK)


def sse_blocks(text):
    """An Anthropic SSE body -> [(event name, data object)]; comments skipped; each event has exactly
    one `event:` and one `data:` line."""
    out = []
    for block in text.split("\n\n"):
        rows = [r for r in block.split("\n") if r and not r.startswith(":")]
        if not rows:
            continue
        assert len(rows) == 2 and rows[0].startswith("event: ") and rows[1].startswith("data: "), block
        out.append((rows[0][len("event: "):], json.loads(rows[1][len("data: "):])))
    return out


def collect_stream(chunks):
    """OpenAI stream chunks -> (content, {index: [tool call deltas]}, last finish_reason)."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        assert len(chunk.choices) == 1, chunk
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            calls.setdefault(d.index, []).append(d)
        if choice.finish_reason is not None:
            finish = choice.finish_reason
    return content, calls, finish


def assemble_calls(calls):
    """Streamed tool call deltas -> the assistant message's tool_calls, as an agent rebuilds them."""
    out = []
    for index in sorted(calls):
        deltas = calls[index]
        out.append({"id": deltas[0].id, "type": "function",
                    "function": {"name": deltas[0].function.name,
                                 "arguments": "".join(d.function.arguments or "" for d in deltas)}})
    return out


class OpenAIToolsEndToEnd(BridgeCase):
    """The openai SDK against the real bridge; the fake tab plays the model's raw text."""

    def setUp(self):
        super().setUp()
        self.tab = self.h.tab(answer("unused"))
        self.client = self.h.client()

    def chat(self, script, messages=QUESTION, tools=OPENAI_TOOLS, **kw):
        self.tab.script = script
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if tools is not None:
            kw["tools"] = tools
        return self.client.chat.completions.create(model="test-model", messages=messages, **kw)

    def assertStreamedCall(self, deltas, name, arguments):
        first = deltas[0]
        self.assertRegex(first.id or "", r"^call_[0-9a-f]{24}$")
        self.assertEqual((first.type, first.function.name), ("function", name))
        for later in deltas[1:]:
            self.assertIn(later.id, (None, first.id))
            self.assertIn(later.function.name, (None, "", name))
        self.assertEqual(json.loads("".join(d.function.arguments or "" for d in deltas)), arguments)

    # 1
    def test_non_streaming_call_and_text(self):
        """Text plus one block gives message.tool_calls, finish_reason tool_calls and the text outside the block as content."""
        r = self.chat(answer("Let me check.\n", BLOCK))
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertEqual(choice.message.content, "Let me check.\n")
        self.assertEqual(len(choice.message.tool_calls), 1)
        call = choice.message.tool_calls[0]
        self.assertRegex(call.id, r"^call_[0-9a-f]{24}$")
        self.assertEqual((call.type, call.function.name), ("function", "get_weather"))
        self.assertEqual(json.loads(call.function.arguments), {"city": "Paris"})

    def test_non_streaming_call_alone_has_null_content(self):
        """An answer that is only a block has content None."""
        r = self.chat(answer(BLOCK))
        self.assertIsNone(r.choices[0].message.content)
        self.assertEqual([c.function.name for c in r.choices[0].message.tool_calls], ["get_weather"])
        self.assertEqual(r.choices[0].finish_reason, "tool_calls")

    # 2
    def test_streaming_split_at_every_position(self):
        """Split anywhere over two rows, no block character leaks into delta.content and the call streams whole."""
        self.tab.record = False
        for i in range(len(SPLIT_ANSWER) + 1):
            with self.subTest(split=i, first=SPLIT_ANSWER[:i][-12:], second=SPLIT_ANSWER[i:][:12]):
                script = [f"a0:{json.dumps(SPLIT_ANSWER[:i])}\n", f"a0:{json.dumps(SPLIT_ANSWER[i:])}\n",
                          'ad:{"finishReason":"stop"}\n', "[DONE]"]
                content, calls, finish = collect_stream(self.chat(script, stream=True))
                for leak in ("<tool", "tool_call", '{"name"'):
                    self.assertNotIn(leak, content)
                self.assertEqual(content, "Sure.")
                self.assertEqual(list(calls), [0])
                self.assertStreamedCall(calls[0], "get_weather", {"city": "Paris"})
                self.assertEqual(finish, "tool_calls")

    # 3
    def test_two_parallel_calls(self):
        """Two blocks give two calls in order with distinct ids, non-streaming and streaming (indexes 0 and 1)."""
        script = answer("Both.\n", BLOCK + "\n" + SEARCH_BLOCK)
        r = self.chat(script)
        calls = r.choices[0].message.tool_calls
        self.assertEqual([(c.function.name, json.loads(c.function.arguments)) for c in calls],
                         [("get_weather", {"city": "Paris"}), ("search", {"q": "rain"})])
        self.assertNotEqual(calls[0].id, calls[1].id)
        self.assertEqual(r.choices[0].finish_reason, "tool_calls")
        content, streamed, finish = collect_stream(self.chat(script, stream=True))
        self.assertEqual(sorted(streamed), [0, 1])
        self.assertStreamedCall(streamed[0], "get_weather", {"city": "Paris"})
        self.assertStreamedCall(streamed[1], "search", {"q": "rain"})
        self.assertNotEqual(streamed[0][0].id, streamed[1][0].id)
        self.assertEqual((content.strip(), finish), ("Both.", "tool_calls"))

    def test_parallel_tool_calls_false_keeps_first_call(self):
        """With parallel_tool_calls false only the first call is returned; the later block is dropped, not shown."""
        script = answer("a", BLOCK, "b", SEARCH_BLOCK, "c")
        r = self.chat(script, parallel_tool_calls=False)
        self.assertEqual([c.function.name for c in r.choices[0].message.tool_calls], ["get_weather"])
        self.assertEqual(r.choices[0].message.content, "abc")
        content, calls, finish = collect_stream(self.chat(script, stream=True, parallel_tool_calls=False))
        self.assertEqual((content, list(calls), finish), ("abc", [0], "tool_calls"))
        self.assertIn("at most one tool", prompt_of(self.tab.tasks[-1]))

    def test_legacy_functions_answer_with_function_call(self):
        """A request with legacy `functions` gets its call back as message.function_call, finish_reason function_call."""
        r = self.chat(answer(BLOCK), tools=None, functions=[OPENAI_TOOLS[0]["function"]])
        self.assertIn("get_weather", prompt_of(self.tab.tasks[-1]))
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "function_call")
        self.assertEqual(choice.message.function_call.name, "get_weather")
        self.assertEqual(json.loads(choice.message.function_call.arguments), {"city": "Paris"})

    def test_json_fence_inside_block(self):
        """A ```json fence inside the block is read as the call."""
        r = self.chat(answer('<tool_call>\n```json\n{"name": "search", "arguments": {"q": "rain"}}\n```\n'
                             "</tool_call>"))
        (call,) = r.choices[0].message.tool_calls
        self.assertEqual((call.function.name, json.loads(call.function.arguments)), ("search", {"q": "rain"}))
        self.assertIsNone(r.choices[0].message.content)

    def test_arguments_given_as_json_string(self):
        """Arguments written as a JSON string are decoded into the call's arguments object."""
        inner = json.dumps({"name": "get_weather", "arguments": json.dumps({"city": "Paris"})})
        r = self.chat(answer(f"<tool_call>\n{inner}\n</tool_call>"))
        (call,) = r.choices[0].message.tool_calls
        self.assertEqual(json.loads(call.function.arguments), {"city": "Paris"})
        self.assertIsInstance(json.loads(call.function.arguments), dict)

    def test_unknown_tool_and_invalid_json_stay_text(self):
        """A block naming an unknown tool or holding invalid JSON comes back verbatim as content, streaming or not."""
        for text in ('Before. <tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call> After.',
                     'Before. <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> After.'):
            with self.subTest(text=text):
                r = self.chat(answer(text[:14], text[14:]))
                self.assertEqual(r.choices[0].message.content, text)
                self.assertIsNone(r.choices[0].message.tool_calls)
                self.assertEqual(r.choices[0].finish_reason, "stop")
                content, calls, finish = collect_stream(self.chat(answer(text[:14], text[14:]), stream=True))
                self.assertEqual((content, calls, finish), (text, {}, "stop"))

    # 4
    def test_tool_choice_none_sends_no_tool_description(self):
        """tool_choice none puts no tool description in the prompt and reads no calls from the answer."""
        r = self.chat(answer(BLOCK), tool_choice="none")
        prompt = prompt_of(self.tab.tasks[-1])
        for absent in ("<tool_call>", "get_weather", "# Tools"):
            self.assertNotIn(absent, prompt)
        self.assertEqual(r.choices[0].message.content, BLOCK)
        self.assertIsNone(r.choices[0].message.tool_calls)
        self.assertEqual(r.choices[0].finish_reason, "stop")

    def test_required_and_named_choice_say_must_call(self):
        """tool_choice required and a named function put "MUST call" in the prompt; auto does not."""
        self.chat(answer("ok"), tool_choice="auto")
        self.assertNotIn("MUST call", prompt_of(self.tab.tasks[-1]))
        self.chat(answer(BLOCK), tool_choice="required")
        self.assertIn("MUST call", prompt_of(self.tab.tasks[-1]))
        self.chat(answer(SEARCH_BLOCK), tool_choice={"type": "function", "function": {"name": "search"}})
        self.assertIn('MUST call the tool "search"', prompt_of(self.tab.tasks[-1]))

    def test_prompt_lists_every_tool(self):
        """The prompt names each tool with its description and parameters schema, and shows the block format."""
        self.chat(answer("ok"))
        prompt = prompt_of(self.tab.tasks[-1])
        for tool in OPENAI_TOOLS:
            fn = tool["function"]
            self.assertIn(fn["name"], prompt)
            self.assertIn(fn["description"], prompt)
            self.assertIn("\n".join(bridge.schema_lines(fn["parameters"])), prompt)
        self.assertIn("- city (string, required): City name.", prompt)
        self.assertIn('<tool_call>\n{"name": "<tool name>", "arguments": {...}}\n</tool_call>', prompt)
        self.assertLess(prompt.index("get_weather"), prompt.index(QUESTION))

    # 5
    def test_history_calls_and_results_become_text(self):
        """Assistant tool_calls and role tool results in the history reach the prompt as blocks naming the call and its result."""
        history = [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT},
            {"role": "user", "content": "And tomorrow?"}]
        for choice in ("auto", "none"):
            with self.subTest(tool_choice=choice):
                self.chat(answer("ok"), messages=history, tool_choice=choice)
                prompt = prompt_of(self.tab.tasks[-1])
                call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                result = f'<tool_result name="get_weather" id="call_1">\n{TOOL_RESULT}\n</tool_result>'
                self.assertIn(call, prompt)
                self.assertIn(result, prompt)
                at = [prompt.index(s) for s in (QUESTION, call, result, "And tomorrow?")]
                self.assertEqual(at, sorted(at))

    # 6
    def test_bad_shapes_are_400_naming_the_field(self):
        """Bad tools / tool_choice give 400 invalid_request_error naming the field, and nothing reaches the tab."""
        cases = [({"tools": {"get_weather": {}}}, "'tools'"),
                 ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
                  "tools[0].function.name"),
                 ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
                  "tool_choice.function.name")]
        for kw, field in cases:
            with self.subTest(field=field):
                tools = kw.pop("tools", OPENAI_TOOLS)
                with self.assertRaises(openai.BadRequestError) as cm:
                    self.chat(answer("never"), tools=tools, **kw)
                self.assertEqual(cm.exception.status_code, 400)
                self.assertEqual(cm.exception.body["type"], "invalid_request_error")
                self.assertIn(field, cm.exception.body["message"])
        self.assertEqual(self.tab.tasks, [])

    # 7
    def test_agent_loop_non_streaming(self):
        """A call, its result sent back with the assistant message, then the final answer; the second turn continues the conversation."""
        messages = [{"role": "user", "content": QUESTION}]
        first = self.chat(agent_script, messages=messages).choices[0]
        self.assertEqual(first.finish_reason, "tool_calls")
        messages.append(first.message.model_dump(exclude_none=True))
        for call in first.message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT})
        second = self.chat(agent_script, messages=messages).choices[0]
        self.assertEqual((second.message.content, second.finish_reason), (FINAL, "stop"))
        self.assertIsNone(second.message.tool_calls)
        self.assertEqual(len(self.tab.tasks), 2)
        self.assertIn(f'<tool_result name="get_weather" id="{first.message.tool_calls[0].id}">',
                      prompt_of(self.tab.tasks[1]))
        self.assertIn("post-to-evaluation", path_of(self.tab.tasks[1]))

    def test_agent_loop_streaming(self):
        """The same loop with streaming: the agent rebuilds the calls from deltas and gets the final answer."""
        messages = [{"role": "user", "content": QUESTION}]
        content, calls, finish = collect_stream(self.chat(agent_script, messages=messages, stream=True))
        self.assertEqual((content, finish), ("Let me check.", "tool_calls"))
        tool_calls = assemble_calls(calls)
        messages.append({"role": "assistant", "content": content or None, "tool_calls": tool_calls})
        for call in tool_calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT})
        content, calls, finish = collect_stream(self.chat(agent_script, messages=messages, stream=True))
        self.assertEqual((content, calls, finish), (FINAL, {}, "stop"))
        self.assertIn(TOOL_RESULT, prompt_of(self.tab.tasks[1]))
        self.assertIn("post-to-evaluation", path_of(self.tab.tasks[1]))


@unittest.skipIf(anthropic is None, "the anthropic SDK is not installed (requirements-dev.txt)")
class AnthropicEndToEnd(BridgeCase):
    """The anthropic SDK (and raw SSE via http.client) against the real bridge and a fake tab."""

    def setUp(self):
        super().setUp()
        self.tab = self.h.tab(answer("unused"))
        self.client = anthropic.Anthropic(base_url=self.h.url, api_key="x", max_retries=0, timeout=20)

    def create(self, script, messages=QUESTION, **kw):
        self.tab.script = script
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.client.messages.create(model="test-model", max_tokens=1024, messages=messages, **kw)

    def stream(self, script, messages=QUESTION, **kw):
        self.tab.script = script
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.client.messages.stream(model="test-model", max_tokens=1024, messages=messages, **kw)

    def raw(self, script, **body):
        """POST /v1/messages with stream true; returns (status, headers, [(event, data)])."""
        self.tab.script = script
        body = {"model": "test-model", "max_tokens": 1024, "stream": True,
                "messages": [{"role": "user", "content": QUESTION}], **body}
        status, headers, data = self.post("/v1/messages", body, headers={"anthropic-version": "2023-06-01"})
        return status, headers, sse_blocks(data.decode())

    # 8
    def test_text_answer(self):
        """A text answer is one text block, stop_reason end_turn, usage counted, id msg_..."""
        m = self.create(answer("Hello ", "world!"))
        self.assertTrue(m.id.startswith("msg_"), m.id)
        self.assertEqual((m.type, m.role, m.model), ("message", "assistant", "test-model"))
        self.assertEqual([(b.type, b.text) for b in m.content], [("text", "Hello world!")])
        self.assertEqual((m.stop_reason, m.stop_sequence), ("end_turn", None))
        self.assertGreater(m.usage.input_tokens, 0)
        self.assertGreater(m.usage.output_tokens, 0)
        self.assertNotIn("<tool_call>", prompt_of(self.tab.tasks[-1]))
        self.assertEqual(self.tab.tasks[-1]["payload"]["request"]["body"]["modelAId"], MODEL_UUID)

    def test_system_as_string_and_as_blocks(self):
        """`system` given as a string or as text blocks reaches the prompt before the user's turn."""
        for system, texts in (("Answer in French.", ["Answer in French."]),
                              ([{"type": "text", "text": "Rule one."},
                                {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}}],
                               ["Rule one.", "Rule two."])):
            with self.subTest(system=system):
                m = self.create(answer("ok"), system=system)
                self.assertEqual(m.content[0].text, "ok")
                prompt = prompt_of(self.tab.tasks[-1])
                at = [prompt.index(t) for t in texts + [QUESTION]]
                self.assertEqual(at, sorted(at))

    def test_reasoning_becomes_thinking_block(self):
        """Reasoning rows become a thinking block before the text block."""
        m = self.create(['ag:"Paris is in France. "\n', 'ag:"Check the weather."\n'] + answer("Sunny."))
        self.assertEqual([b.type for b in m.content], ["thinking", "text"])
        self.assertEqual(m.content[0].thinking, "Paris is in France. Check the weather.")
        self.assertEqual(m.content[1].text, "Sunny.")

    # 9
    def test_sdk_stream_text_and_final_message(self):
        """messages.stream yields the text deltas in order and get_final_message rebuilds the answer."""
        pause = ("sleep", 0.02)
        script = ['a0:"Hel"\n', pause, 'a0:"lo "\n', pause, 'a0:"world!"\n', pause,
                  'ad:{"finishReason":"stop"}\n', "[DONE]"]
        with self.stream(script) as s:
            texts = list(s.text_stream)
            message = s.get_final_message()
        self.assertEqual("".join(texts), "Hello world!")
        self.assertGreaterEqual(len(texts), 2)
        self.assertEqual([(b.type, b.text) for b in message.content], [("text", "Hello world!")])
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertTrue(message.id.startswith("msg_"))
        self.assertGreater(message.usage.output_tokens, 0)

    def test_raw_sse_event_sequence(self):
        """The raw stream is message_start, block start, deltas, block stop, message_delta, message_stop; each data type repeats its event line."""
        status, headers, events = self.raw(['ag:"Hmm."\n', ("sleep", 0.02), 'a0:"Hello "\n', ("sleep", 0.02)]
                                           + answer("world!"))
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        for name, data in events:
            self.assertEqual(name, data["type"])
        names = [n for n, _ in events if n != "ping"]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        blocks = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
        self.assertEqual(blocks, [(0, "thinking"), (1, "text")])
        squeezed = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
        self.assertEqual(squeezed, ["message_start",
                                    "content_block_start", "content_block_delta", "content_block_stop",
                                    "content_block_start", "content_block_delta", "content_block_stop",
                                    "message_delta", "message_stop"])
        text = "".join(d["delta"]["text"] for n, d in events
                       if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
        self.assertEqual(text, "Hello world!")
        start = events[0][1]["message"]
        self.assertTrue(start["id"].startswith("msg_"))
        self.assertEqual((start["content"], start["stop_reason"]), ([], None))
        delta = [d for n, d in events if n == "message_delta"][0]
        self.assertEqual(delta["delta"], {"stop_reason": "end_turn", "stop_sequence": None})
        self.assertGreater(delta["usage"]["output_tokens"], 0)

    # 10
    def test_tool_use_non_streaming(self):
        """An Anthropic tool is answered with a tool_use block (toolu_ id, input dict) and stop_reason tool_use."""
        m = self.create(answer("Let me check.", BLOCK), tools=ANTHROPIC_TOOLS)
        self.assertEqual([b.type for b in m.content], ["text", "tool_use"])
        self.assertEqual(m.content[0].text, "Let me check.")
        use = m.content[1]
        self.assertRegex(use.id, r"^toolu_[0-9a-f]{24}$")
        self.assertEqual((use.name, use.input), ("get_weather", {"city": "Paris"}))
        self.assertEqual(m.stop_reason, "tool_use")
        prompt = prompt_of(self.tab.tasks[-1])
        self.assertIn("<tool_call>", prompt)
        self.assertIn("- city (string, required): City name.", prompt)

    def test_tool_use_streaming(self):
        """Streaming sends the tool_use block with an input_json_delta; the SDK's final message has the input dict."""
        script = ['a0:"Let me check."\n', ("sleep", 0.02), 'a0:' + json.dumps(BLOCK[:20]) + "\n",
                  ("sleep", 0.02), 'a0:' + json.dumps(BLOCK[20:]) + "\n", 'ad:{"finishReason":"stop"}\n', "[DONE]"]
        status, _, events = self.raw(script, tools=ANTHROPIC_TOOLS)
        self.assertEqual(status, 200)
        starts = [d["content_block"] for n, d in events if n == "content_block_start"]
        self.assertEqual([b["type"] for b in starts], ["text", "tool_use"])
        self.assertEqual((starts[1]["name"], starts[1]["input"]), ("get_weather", {}))
        partial = "".join(d["delta"]["partial_json"] for n, d in events
                          if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
        self.assertEqual(json.loads(partial), {"city": "Paris"})
        text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
        self.assertEqual(text, "Let me check.")
        delta = [d for n, d in events if n == "message_delta"][0]
        self.assertEqual(delta["delta"]["stop_reason"], "tool_use")
        with self.stream(script, tools=ANTHROPIC_TOOLS) as s:
            message = s.get_final_message()
        self.assertEqual([b.type for b in message.content], ["text", "tool_use"])
        self.assertEqual(message.content[1].input, {"city": "Paris"})
        self.assertEqual(message.stop_reason, "tool_use")

    def test_tool_choice_none_any_and_tool(self):
        """tool_choice none sends no tool description; any and tool put "MUST call" in the prompt."""
        m = self.create(answer(BLOCK), tools=ANTHROPIC_TOOLS, tool_choice={"type": "none"})
        self.assertNotIn("<tool_call>", prompt_of(self.tab.tasks[-1]))
        self.assertEqual(([b.type for b in m.content], m.stop_reason), (["text"], "end_turn"))
        self.create(answer(BLOCK), tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"})
        self.assertIn("MUST call", prompt_of(self.tab.tasks[-1]))
        self.create(answer(BLOCK), tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
        self.assertIn('MUST call the tool "get_weather"', prompt_of(self.tab.tasks[-1]))

    def test_agent_loop_with_tool_result(self):
        """tool_use, then a tool_result round trip gives the final answer, non-streaming and streaming."""
        for streaming in (False, True):
            with self.subTest(streaming=streaming):
                question = f"{QUESTION} ({'streaming' if streaming else 'plain'})"
                messages = [{"role": "user", "content": question}]
                before = len(self.tab.tasks)
                if streaming:
                    with self.stream(agent_script, messages=messages, tools=ANTHROPIC_TOOLS) as s:
                        first = s.get_final_message()
                else:
                    first = self.create(agent_script, messages=messages, tools=ANTHROPIC_TOOLS)
                self.assertEqual(first.stop_reason, "tool_use")
                uses = [b for b in first.content if b.type == "tool_use"]
                self.assertEqual(len(uses), 1)
                messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                                  for b in first.content]})
                messages.append({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": TOOL_RESULT}]})
                if streaming:
                    with self.stream(agent_script, messages=messages, tools=ANTHROPIC_TOOLS) as s:
                        final = s.get_final_message()
                else:
                    final = self.create(agent_script, messages=messages, tools=ANTHROPIC_TOOLS)
                self.assertEqual([(b.type, b.text) for b in final.content], [("text", FINAL)])
                self.assertEqual(final.stop_reason, "end_turn")
                tasks = self.tab.tasks[before:]
                self.assertEqual(len(tasks), 2)
                self.assertIn(f'<tool_result name="get_weather" id="{uses[0].id}">\n{TOOL_RESULT}\n</tool_result>',
                              prompt_of(tasks[1]))
                self.assertIn("post-to-evaluation", path_of(tasks[1]))

    def test_blank_text_around_the_call_still_continues(self):
        """Whitespace beside the block: the non-streaming answer leaves a blank text block out, the
        streamed one sends "\n" after the tool_use as a block of its own, which the client sends
        back; either way the follow-up continues the LMArena conversation (it started a new one)."""
        for streaming, rows in ((False, answer("\n", BLOCK)), (True, answer("Let me check.\n", BLOCK, "\n"))):
            with self.subTest(streaming=streaming):
                before = len(self.tab.tasks)
                if streaming:
                    with self.stream(rows, tools=ANTHROPIC_TOOLS) as s:
                        first = s.get_final_message()
                else:
                    first = self.create(rows, tools=ANTHROPIC_TOOLS)
                use = [b for b in first.content if b.type == "tool_use"][0]
                messages = [{"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                          "content": TOOL_RESULT}]}]
                self.create(answer(FINAL), messages=messages, tools=ANTHROPIC_TOOLS)
                self.assertIn("post-to-evaluation", path_of(self.tab.tasks[before + 1]))

    # 11
    def test_stop_sequences_non_streaming(self):
        """A stop sequence split across rows cuts the text before it, with stop_reason stop_sequence."""
        m = self.create(answer("Hello wor", "ld! EN", "D and more"), stop_sequences=["NEVER", "END"])
        self.assertEqual([(b.type, b.text) for b in m.content], [("text", "Hello world! ")])
        self.assertEqual((m.stop_reason, m.stop_sequence), ("stop_sequence", "END"))

    def test_stop_sequences_streaming(self):
        """Streaming: the text stops before the stop sequence, the tab is told to stop, and the stream ends without waiting for it."""
        script = lines("Hello wor", "ld! EN", finish=None) + [("sleep", 0.05), 'a0:"D and more"\n', ("hang",)]
        started = time.monotonic()
        with self.stream(script, stop_sequences=["END"]) as s:
            texts = list(s.text_stream)
            message = s.get_final_message()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual("".join(texts), "Hello world! ")
        self.assertEqual((message.stop_reason, message.stop_sequence), ("stop_sequence", "END"))
        self.assertEqual(self.tab.wait_command("abort")["request_id"], self.tab.tasks[-1]["request_id"])
        status, _, events = self.raw(answer("Hello wor", "ld! EN", "D and more"), stop_sequences=["END"])
        delta = [d for n, d in events if n == "message_delta"][0]
        self.assertEqual(delta["delta"], {"stop_reason": "stop_sequence", "stop_sequence": "END"})

    def test_tool_call_then_stop_sequence_is_tool_use(self):
        """A tool call followed by a stop sequence still ends with stop_reason tool_use."""
        m = self.create(answer("Let me check.", BLOCK, "\nEND"), tools=ANTHROPIC_TOOLS,
                        stop_sequences=["END"])
        self.assertEqual([b.type for b in m.content], ["text", "tool_use"])
        self.assertEqual((m.stop_reason, m.stop_sequence), ("tool_use", None))

    # 12 (with a tab; the key and no-tab cases are in the classes below)
    def test_bad_requests_are_invalid_request_error(self):
        """Missing max_tokens or messages, or empty messages, give 400 invalid_request_error naming the field."""
        for body, field in (({"model": "test-model", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
                            ({"model": "test-model", "max_tokens": 10}, "messages")):
            with self.subTest(field=field):
                status, _, data = self.post("/v1/messages", body)
                self.assertEqual(status, 400)
                err = json.loads(data)
                self.assertEqual((err["type"], err["error"]["type"]), ("error", "invalid_request_error"))
                self.assertIn(field, err["error"]["message"])
        with self.assertRaises(anthropic.BadRequestError) as cm:
            self.create(answer("never"), messages=[])
        self.assertEqual(cm.exception.body["error"]["type"], "invalid_request_error")
        self.assertEqual(self.tab.tasks, [])

    def test_error_after_stream_started_is_error_event(self):
        """An LMArena error after text has streamed arrives as `event: error` (raw) and raises in the SDK."""
        script = lines("partial ", finish=None) + [("sleep", 0.05), 'a3:"The model failed"\n', "[DONE]"]
        status, _, events = self.raw(script)
        self.assertEqual(status, 200)
        self.assertEqual(events[0][0], "message_start")
        self.assertEqual(events[-1][0], "error")
        self.assertEqual(events[-1][1]["type"], "error")
        self.assertEqual(events[-1][1]["error"]["type"], "api_error")
        self.assertNotIn("message_stop", [n for n, _ in events])
        texts = []
        with self.assertRaises(anthropic.APIStatusError) as cm:
            with self.stream(script) as s:
                for text in s.text_stream:
                    texts.append(text)
        self.assertEqual("".join(texts), "partial ")
        self.assertIn("The model failed", str(cm.exception))

    # 13
    def test_count_tokens(self):
        """messages.count_tokens answers input_tokens > 0, more with tools, equal to the message's usage for text."""
        messages = [{"role": "user", "content": QUESTION}]
        plain = self.client.messages.count_tokens(model="test-model", messages=messages).input_tokens
        self.assertGreater(plain, 0)
        with_tools = self.client.messages.count_tokens(model="test-model", messages=messages,
                                                       tools=ANTHROPIC_TOOLS, system="Be brief.").input_tokens
        self.assertGreater(with_tools, plain + 50)
        m = self.create(answer("ok"), messages=messages, tools=ANTHROPIC_TOOLS, system="Be brief.")
        self.assertEqual(m.usage.input_tokens, with_tools)
        self.assertEqual(len(self.tab.tasks), 1)      # counting sent nothing to the tab

    def test_count_tokens_matches_usage_with_image(self):
        """count_tokens and the message's usage.input_tokens agree for a body with an image."""
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(PNG_BYTES).decode()}}]}]
        counted = self.client.messages.count_tokens(model="test-model", messages=messages).input_tokens
        m = self.create(answer("A picture."), messages=messages)
        self.assertEqual(m.usage.input_tokens, counted)

    # 14
    def test_image_block_becomes_attachment(self):
        """A base64 image block reaches the task as an experimental_attachments data URL with its media type."""
        data = base64.b64encode(PNG_BYTES).decode()
        self.create(answer("A picture."), messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}])
        user = self.tab.tasks[-1]["payload"]["request"]["body"]["userMessage"]
        self.assertIn("What is in this picture?", user["content"])
        (att,) = user["experimental_attachments"]
        self.assertEqual(att["contentType"], "image/png")
        self.assertEqual(att["url"], f"data:image/png;base64,{data}")
        self.assertTrue(att["name"].endswith(".png"), att["name"])


@unittest.skipIf(anthropic is None, "the anthropic SDK is not installed (requirements-dev.txt)")
class AnthropicWithApiKey(BridgeCase):
    config = {"api_key": "k"}

    def client(self, **kw):
        return anthropic.Anthropic(base_url=self.h.url, max_retries=0, timeout=20, **kw)

    def test_wrong_key_is_authentication_error(self):
        """A wrong key gives the SDK's AuthenticationError with Anthropic's error body; count_tokens too."""
        self.h.tab(answer("never"))
        with self.assertRaises(anthropic.AuthenticationError) as cm:
            self.client(api_key="wrong").messages.create(model="test-model", max_tokens=10,
                                                          messages=[{"role": "user", "content": "x"}])
        self.assertEqual(cm.exception.status_code, 401)
        body = cm.exception.body
        self.assertEqual((body["type"], body["error"]["type"]), ("error", "authentication_error"))
        self.assertIsInstance(body["error"]["message"], str)
        with self.assertRaises(anthropic.AuthenticationError):
            self.client(api_key="wrong").messages.count_tokens(model="test-model",
                                                               messages=[{"role": "user", "content": "x"}])
        self.assertEqual(self.h.tabs[0].tasks, [])

    def test_x_api_key_and_bearer_accepted(self):
        """The right key works as x-api-key (the SDK's api_key) and as Authorization: Bearer (auth_token)."""
        tab = self.h.tab(answer("fine"))
        m = self.client(api_key="k").messages.create(model="test-model", max_tokens=10,
                                                     messages=[{"role": "user", "content": "x"}])
        self.assertEqual(m.content[0].text, "fine")
        m = self.client(auth_token="k").messages.create(model="test-model", max_tokens=10,
                                                        messages=[{"role": "user", "content": "x"}])
        self.assertEqual(m.content[0].text, "fine")
        status, _, data = self.post("/v1/messages", {"model": "test-model", "max_tokens": 10,
                                                     "messages": [{"role": "user", "content": "x"}]},
                                    headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
        self.assertEqual((status, json.loads(data)["content"][0]["text"]), (200, "fine"))
        self.assertEqual(len(tab.tasks), 3)


@unittest.skipIf(anthropic is None, "the anthropic SDK is not installed (requirements-dev.txt)")
class AnthropicWithoutTab(BridgeCase):

    def test_no_tab_is_503_api_error_not_retried(self):
        """With no tab connected /v1/messages answers 503 at once, streaming or not, with an api_error
        (not overloaded_error: nothing is busy) and x-should-retry: false, so the SDK (default
        retries on) and Claude Code fail at once instead of retrying for minutes."""
        client = anthropic.Anthropic(base_url=self.h.url, api_key="x", timeout=20)    # SDK retries on
        started = time.monotonic()
        with self.assertRaises(anthropic.APIStatusError) as cm:
            client.messages.create(model="test-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        self.assertLess(time.monotonic() - started, 0.4)     # one retry would wait 0.5 s or more
        self.assertEqual(cm.exception.status_code, 503)
        self.assertEqual(cm.exception.response.headers["x-should-retry"], "false")
        self.assertEqual(cm.exception.body["type"], "error")
        self.assertEqual(cm.exception.body["error"]["type"], "api_error")
        self.assertIn("No LMArena tab", cm.exception.body["error"]["message"])
        status, headers, data = self.post("/v1/messages", {"model": "test-model", "max_tokens": 10, "stream": True,
                                                           "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(status, 503)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        self.assertEqual(json.loads(data)["error"]["type"], "api_error")

    def test_count_tokens_needs_no_tab(self):
        """count_tokens answers without any tab connected."""
        client = anthropic.Anthropic(base_url=self.h.url, api_key="x", max_retries=0, timeout=20)
        counted = client.messages.count_tokens(model="test-model", messages=[{"role": "user", "content": "x" * 40}])
        self.assertEqual(counted.input_tokens, 10)


if __name__ == "__main__":
    unittest.main()


class LongPromptRefusal(BridgeCase):
    def test_prompt_failed_on_a_long_prompt_is_prompt_too_long(self):
        """LMArena's "prompt failed" 429 for a prompt of agent size is reported as 413 prompt_too_long
        naming the size (not a rate limit), and the tab does not rest; for a short prompt it stays a
        rate limit."""
        tab = self.h.tab()
        tab.script = [{"error": '{"error":"prompt failed"}', "status": 429}]
        client = self.h.client()
        with self.assertRaises(openai.APIStatusError) as cm:
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "x" * 40000}])
        self.assertEqual((cm.exception.status_code, cm.exception.code), (413, "prompt_too_long"))
        self.assertIn("40000 characters", cm.exception.message)
        self.assertEqual(cm.exception.response.headers["x-should-retry"], "false")
        self.assertEqual(self.h.bridge.tabs[0].cool_until, 0)
        with self.assertRaises(openai.RateLimitError):
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "short"}])
