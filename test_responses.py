"""OpenAI's Responses API (`/v1/responses`), the API of Codex CLI and the OpenAI Agents SDK.

  (a) Pure: input items, instructions, tools and text.format -> the Conversation; the JSON check.
  (b) End to end with the official `openai` Python SDK against a real bridge and a FakeTab: plain and
      streamed answers (the exact event sequence, sequence numbers from 0), function and custom tool
      calls, reasoning items, previous_response_id (continued on LMArena), store false, GET, JSON
      output, errors before and after the stream starts.
  (c) The official `openai` Node SDK (pinned in package.json) doing the same through a script.

Run: python -m unittest -v test_responses
"""
import json
import os
import shutil
import subprocess
import unittest

import openai

import bridge
from bridge import ApiError
from testsupport import HERE, BridgeCase, lines

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": False}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}}
HOSTED = [{"type": "web_search", "external_web_access": False},
          {"type": "namespace", "name": "multi_agent_v1", "tools": [WEATHER]},
          {"type": "tool_search", "execution": "client", "parameters": {"type": "object"}}]
CALL_ROWS = lines("Checking. ", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
PATCH_TEXT = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"
PATCH_ROWS = lines("<tool_call>\n" + json.dumps({"name": "apply_patch", "input": PATCH_TEXT}) + "\n</tool_call>")


def convert(data, history=None):
    conv = bridge.responses_conversation(data, bridge.Config(), history)
    return conv, bridge.transcript(conv.turns)


def prompt_of(task):
    return task["payload"]["request"]["body"]["userMessage"]["content"]


# (a) Pure ==========================================================================================

class ResponsesRequestTests(unittest.TestCase):

    def assertBad(self, data, field):
        with self.assertRaises(ApiError) as cm:
            convert(data)
        self.assertEqual((cm.exception.status, cm.exception.code), (400, "invalid_request_error"))
        self.assertIn(field, cm.exception.message)

    def test_string_input_and_instructions(self):
        conv, out = convert({"model": "m", "input": "hi", "instructions": "Be brief."})
        self.assertEqual([(t["role"], t["content"]) for t in out], [("system", "Be brief."), ("user", "hi")])
        self.assertEqual((conv.model, conv.stream, conv.tools), ("m", False, None))
        self.assertTrue(conv.options.store)

    def test_every_input_item(self):
        """Messages (with or without type; developer is system; every part type), an assistant
        message and its calls as one turn, function and custom outputs named after their calls;
        reasoning and server-side items left out."""
        conv, out = convert({"model": "m", "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
            {"role": "user", "content": [
                {"type": "input_text", "text": "Look"},
                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}],
             "encrypted_content": "xyz"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Working."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "custom_tool_call", "id": "ctc_1", "call_id": "call_2", "name": "apply_patch", "input": PATCH_TEXT},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
            {"type": "custom_tool_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "Done."}]},
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {"type": "item_reference", "id": "msg_9"},
            {"role": "user", "content": "Next?"}]})
        self.assertEqual([t["role"] for t in out], ["system", "user", "assistant", "user", "user"])
        self.assertEqual(out[0]["content"], "Rules.")
        self.assertEqual([a["name"] for a in out[1]["attachments"]], ["image_1.png", "a.pdf"])
        self.assertEqual(out[2]["content"],
                         'Working.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                         '</tool_call>\n<tool_call>\n' + json.dumps({"name": "apply_patch", "input": PATCH_TEXT})
                         + "\n</tool_call>")
        self.assertEqual(out[3]["content"], '<tool_result name="get_weather" id="call_1">\nSunny\n</tool_result>\n'
                         '<tool_result name="apply_patch" id="call_2">\nDone.\n</tool_result>')
        self.assertEqual(out[4]["content"], "Next?")
        self.assertEqual(conv.turns[2].calls[1], bridge.Call("call_2", "apply_patch", PATCH_TEXT, True))

    def test_tools_hosted_left_out_and_custom_described(self):
        """Function and custom tools are offered (the custom one with its grammar); hosted tools,
        namespaces and tool_search are left out, never refused."""
        conv, _ = convert({"model": "m", "input": "x", "tools": [WEATHER, PATCH] + HOSTED,
                           "tool_choice": "required", "parallel_tool_calls": False})
        spec = conv.tools
        self.assertEqual(spec.names, {"get_weather", "apply_patch"})
        self.assertEqual((spec.choice, spec.parallel), ("required", False))
        prompt = bridge.tool_prompt(spec)
        self.assertIn("## apply_patch\nEdit files with a patch.\nInput: free-form text", prompt)
        self.assertIn("start: begin_patch hunk+ end_patch", prompt)
        self.assertIn('"input": "<the whole input as one JSON string>"', prompt)
        self.assertIn("- city (string, required)", prompt)
        for choice, want in (({"type": "function", "name": "get_weather"}, "get_weather"),
                             ({"type": "custom", "name": "apply_patch"}, "apply_patch"),
                             ({"type": "web_search"}, "auto"),
                             ({"type": "allowed_tools", "mode": "required", "tools": []}, "required")):
            self.assertEqual(convert({"model": "m", "input": "x", "tools": [WEATHER, PATCH],
                                      "tool_choice": choice})[0].tools.choice, want)
        self.assertIsNone(convert({"model": "m", "input": "x", "tools": HOSTED})[0].tools)

    def test_codex_first_request_fixture(self):
        """Codex CLI's real first request (recorded): developer messages as system, exec_command offered,
        the namespace and web_search left out; apply_patch (custom, lark) offered for a known model."""
        with open(os.path.join(HERE, "fixtures", "codex_first_request.json"), encoding="utf-8") as f:
            conv, out = convert(json.load(f))
        self.assertEqual([t["role"] for t in out], ["system", "system", "user", "user"])
        self.assertIn("exec_command", conv.tools.names)
        self.assertNotIn("multi_agent_v1", conv.tools.names)
        self.assertFalse(conv.options.store)
        with open(os.path.join(HERE, "fixtures", "codex_known_model_tool_result_request.json"), encoding="utf-8") as f:
            conv, out = convert(json.load(f))
        self.assertIn("apply_patch", {t.name for t in conv.tools.tools if t.custom})
        self.assertIn('<tool_result name="apply_patch"', out[-1]["content"])

    def test_json_format_is_asked_for_and_checked(self):
        conv, out = convert({"model": "m", "input": "x", "text": {"format": {
            "type": "json_schema", "name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}})
        self.assertEqual(conv.options.json_format, "json_schema")
        self.assertIn("one valid JSON value", out[-1]["content"])
        self.assertIn('"a":{"type":"integer"}', out[-1]["content"])
        self.assertEqual(bridge.json_answer('```json\n{"a": 1}\n```'), '{"a": 1}')
        self.assertEqual(bridge.json_answer(' [1, 2] '), '[1, 2]')
        self.assertIsNone(bridge.json_answer('Sure: {"a": 1}'))
        self.assertIsNone(bridge.json_answer('{"a": NaN}'))

    def test_previous_turns_come_before_the_new_input(self):
        history = [bridge.Turn("user", "one"), bridge.Turn("assistant", "two")]
        conv, out = convert({"model": "m", "input": "three", "instructions": "Now."}, history)
        self.assertEqual([t["content"] for t in out], ["Now.", "one", "two", "three"])
        self.assertEqual([t.text for t in conv.options.carried], ["one", "two", "three"])

    def test_errors_name_the_field(self):
        self.assertBad({"input": "x"}, "'model'")
        self.assertBad({"model": "m"}, "'input'")
        self.assertBad({"model": "m", "input": []}, "'input'")
        self.assertBad({"model": "m", "input": 5}, "'input'")
        self.assertBad({"model": "m", "input": "x", "stream": "yes"}, "'stream'")
        self.assertBad({"model": "m", "input": [3]}, "input[0]")
        self.assertBad({"model": "m", "input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role")
        self.assertBad({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
                       "input[0].call_id")
        self.assertBad({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id")
        self.assertBad({"model": "m", "input": [{"type": "wat"}]}, "input[0].type")
        self.assertBad({"model": "m", "input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name")
        self.assertBad({"model": "m", "input": "x", "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                                     "name": "nope"}}, "tool_choice")
        self.assertBad({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type")
        self.assertBad({"model": "m", "input": "x", "store": "no"}, "'store'")
        self.assertBad({"model": "m", "input": "x", "instructions": 4}, "'instructions'")


# (b) End to end with the Python SDK =============================================================

class ResponsesEndToEnd(BridgeCase):

    def setUp(self):
        super().setUp()
        self.tab = self.h.tab()
        self.client = openai.OpenAI(base_url=self.h.url + "/v1", api_key="x", max_retries=0, timeout=20)
        self.addCleanup(self.client.close)

    def events(self, **kw):
        return list(self.client.responses.create(model="test-model", stream=True, **kw))

    def test_plain_answer(self):
        r = self.client.responses.create(model="test-model", input="hello", instructions="Be brief.",
                                         metadata={"k": "v"})
        self.assertEqual((r.status, r.output_text, r.object, r.model), ("completed", "Hello world!", "response",
                                                                          "test-model"))
        self.assertTrue(r.id.startswith("resp_"))
        self.assertEqual([o.type for o in r.output], ["message"])
        self.assertTrue(r.output[0].id.startswith("msg_"))
        self.assertEqual((r.instructions, r.metadata), ("Be brief.", {"k": "v"}))
        self.assertEqual(r.usage.total_tokens, r.usage.input_tokens + r.usage.output_tokens)
        self.assertEqual(self.client.responses.retrieve(r.id).output_text, "Hello world!")
        status, _, raw = self.get(f"/responses/{r.id}")          # also without /v1, like POST /responses
        self.assertEqual((status, json.loads(raw)["id"]), (200, r.id))

    def test_stream_event_sequence(self):
        """The exact event order of a text answer, sequence numbers 0, 1, 2, ..., no [DONE]."""
        self.tab.script = lines("Hel", "lo ", "there")
        events = self.events(input="hi")
        self.assertEqual([e.type for e in events], [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed"])
        self.assertEqual([e.sequence_number for e in events], list(range(len(events))))
        self.assertEqual(events[5].text, "Hello there")
        self.assertEqual(events[-1].response.output_text, "Hello there")
        self.assertEqual(events[0].response.status, "in_progress")
        status, headers, raw = self.post("/v1/responses", {"model": "test-model", "input": "x", "stream": True})
        self.assertNotIn(b"[DONE]", raw)
        self.assertIn(b"event: response.completed\ndata: {", raw)

    def test_function_call(self):
        self.tab.script = CALL_ROWS
        r = self.client.responses.create(model="test-model", input="weather?", tools=[WEATHER] + HOSTED)
        self.assertEqual([o.type for o in r.output], ["message", "function_call"])
        call = r.output[1]
        self.assertEqual((call.name, json.loads(call.arguments), call.status), ("get_weather", {"city": "Paris"},
                                                                               "completed"))
        self.assertTrue(call.call_id.startswith("call_") and call.id.startswith("fc_"))
        self.assertIn("## get_weather", prompt_of(self.tab.tasks[-1]))
        events = self.events(input="weather?", tools=[WEATHER])
        kinds = [e.type for e in events]
        self.assertEqual(kinds[kinds.index("response.output_item.done") + 1:], [
            "response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done", "response.completed"])
        self.assertEqual(events[-2].item.arguments, '{"city":"Paris"}')

    def test_custom_tool_call(self):
        self.tab.script = PATCH_ROWS
        r = self.client.responses.create(model="test-model", input="add hello.txt", tools=[PATCH])
        self.assertEqual([(o.type, o.name, o.input) for o in r.output], [("custom_tool_call", "apply_patch", PATCH_TEXT)])
        kinds = [e.type for e in self.events(input="add", tools=[PATCH])]
        self.assertIn("response.custom_tool_call_input.delta", kinds)
        self.assertIn("response.custom_tool_call_input.done", kinds)

    def test_reasoning_item_with_summary(self):
        self.tab.script = ['ag:"Think"\n', 'ag:"ing."\n'] + lines("Answer.")
        r = self.client.responses.create(model="test-model", input="q")
        self.assertEqual([o.type for o in r.output], ["reasoning", "message"])
        self.assertEqual(r.output[0].summary[0].text, "Thinking.")
        kinds = [e.type for e in self.events(input="q")]
        self.assertEqual(kinds[2:8], ["response.output_item.added", "response.reasoning_summary_part.added",
                                      "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
                                      "response.reasoning_summary_part.done", "response.output_item.done"])

    def test_previous_response_continues_the_conversation(self):
        """A follow-up by previous_response_id sends only the new turn, as a follow-up on LMArena;
        the tool result of a function call comes back the same way."""
        self.tab.script = CALL_ROWS
        first = self.client.responses.create(model="test-model", input="weather?", tools=[WEATHER])
        call = first.output[1]
        self.tab.script = lines("It is sunny.")
        second = self.client.responses.create(model="test-model", previous_response_id=first.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])
        self.assertEqual(second.output_text, "It is sunny.")
        self.assertEqual(second.previous_response_id, first.id)
        task = self.tab.tasks[-1]
        self.assertIn("post-to-evaluation", task["payload"]["request"]["path"])
        self.assertEqual(prompt_of(task), f'<tool_result name="get_weather" id="{call.call_id}">\nSunny\n</tool_result>')

    def test_items_sent_back_continue_the_conversation(self):
        """Codex (store false) sends the answer's items back as input. A streamed answer with "\n"
        after the block has a second message item after the call; a non-streaming one with only
        "\n" before it has no message item. Both continue the LMArena conversation (before: a new
        conversation each time, the whole history sent again)."""
        block = CALL_ROWS[1][3:-1]
        for stream, rows in ((True, lines("Checking.\n", json.loads(block), "\n")), (False, lines("\n", json.loads(block)))):
            with self.subTest(stream=stream):
                self.tab.script = rows
                if stream:
                    output = self.events(input="weather?", tools=[WEATHER], store=False)[-1].response.output
                else:
                    output = self.client.responses.create(model="test-model", input="weather?", tools=[WEATHER],
                                                          store=False).output
                items = [o.model_dump(exclude_none=True) for o in output]
                self.assertEqual([i["type"] for i in items], ["message", "function_call", "message"] if stream
                                 else ["function_call"])
                call = [o for o in output if o.type == "function_call"][0]
                self.tab.script = lines("It is sunny.")
                self.client.responses.create(model="test-model", tools=[WEATHER], store=False, input=[
                    {"role": "user", "content": "weather?"}, *items,
                    {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])
                self.assertIn("post-to-evaluation", self.tab.tasks[-1]["payload"]["request"]["path"])
                self.assertEqual(prompt_of(self.tab.tasks[-1]),
                                 f'<tool_result name="get_weather" id="{call.call_id}">\nSunny\n</tool_result>')

    def test_kept_responses_bounded_by_their_whole_size(self):
        """The store counted a kept conversation by its prompt size, where an attachment is a flat
        4000 characters: 256 responses of 60 MiB of images each could stay (15 GiB). Now everything
        kept counts (data URLs too), and all entries together stay under max_chars."""
        store = self.h.bridge.routes.responses = bridge.ResponseStore(max_chars=8 * 2**20)
        image = "data:image/png;base64," + "A" * (3 * 2**20)
        ids = []
        for _ in range(6):
            ids.append(self.client.responses.create(model="test-model", input=[{"role": "user", "content": [
                {"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": image}]}]).id)
        kept = sum(len(f["url"]) for entry in store.entries.values() for t in entry[1] for f in t.files)
        self.assertLessEqual(kept, 8 * 2**20)
        self.assertEqual(self.client.responses.retrieve(ids[-1]).id, ids[-1])
        with self.assertRaises(openai.NotFoundError):
            self.client.responses.retrieve(ids[0])

    def test_deeply_nested_fields_are_not_repeated(self):
        """metadata (or reasoning, user) nested nearly as deep as the JSON parser allows: repeated in
        the events a few levels deeper, it made a RecursionError (a 500, or a stream cut without
        response.completed). Such fields are not repeated now."""
        for depth in range(960, 992, 4):
            body = '{"model": "test-model", "input": "x", "stream": true, "metadata": %s}' % ("[" * depth + "]" * depth)
            status, _, raw = self.post("/v1/responses", body)
            self.assertIn(status, (200, 400), (depth, raw[:200]))
            if status == 200:
                self.assertIn(b"event: response.completed", raw, depth)

    def test_store_false_keeps_nothing(self):
        r = self.client.responses.create(model="test-model", input="x", store=False)
        with self.assertRaises(openai.NotFoundError):
            self.client.responses.retrieve(r.id)
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.responses.create(model="test-model", input="y", previous_response_id=r.id)
        self.assertEqual(cm.exception.code, "previous_response_not_found")
        self.assertEqual(cm.exception.response.headers["x-should-retry"], "false")

    def test_json_output(self):
        self.tab.script = lines('```json\n{"a": ', '1}\n```')
        r = self.client.responses.create(model="test-model", input="x", text={"format": {"type": "json_object"}})
        self.assertEqual(json.loads(r.output_text), {"a": 1})
        events = self.events(input="x", text={"format": {"type": "json_object"}})
        self.assertEqual(json.loads(events[-1].response.output_text), {"a": 1})
        self.tab.script = lines("Sure! a is 1.")
        with self.assertRaises(openai.APIStatusError) as cm:
            self.client.responses.create(model="test-model", input="x", text={"format": {"type": "json_object"}})
        self.assertEqual(cm.exception.code, "invalid_json_output")
        events = self.events(input="x", text={"format": {"type": "json_object"}})
        self.assertEqual([e.type for e in events][-2:], ["error", "response.failed"])

    def test_errors_before_and_after_the_stream(self):
        with self.assertRaises(openai.BadRequestError):
            self.client.responses.create(model="test-model", input=[{"type": "wat"}])
        self.tab.script = lines("part") [:1] + [{"error": "boom", "status": 500}]
        events = self.events(input="x")
        self.assertEqual([e.type for e in events][-2:], ["error", "response.failed"])
        self.assertEqual(events[-1].response.status, "failed")
        self.assertEqual(events[-1].response.error.code, "upstream_error")


# (c) The official Node SDK =========================================================================

NODE_SCRIPT = r"""
const OpenAI = require('openai');
const client = new OpenAI({ baseURL: process.argv[2], apiKey: 'x', maxRetries: 0 });
const tools = [{ type: 'function', name: 'get_weather', description: 'Weather.', parameters:
  { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }, strict: false }];
(async () => {
  const out = {};
  const r = await client.responses.create({ model: 'test-model', input: 'weather?', tools });
  out.plain = r.output.map((o) => [o.type, o.name || null, o.arguments || null]);
  out.text = r.output_text;
  const stream = await client.responses.create({ model: 'test-model', input: 'weather?', tools, stream: true });
  out.events = [];
  for await (const ev of stream) out.events.push([ev.type, ev.sequence_number]);
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(String(e)); process.exit(1); });
"""


class ResponsesNodeSdk(BridgeCase):
    def test_node_sdk_plain_and_streamed_with_tools(self):
        node_sdk = os.path.join(HERE, "node_modules", "openai")
        if not os.path.isdir(node_sdk):
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, capture_output=True,
                           timeout=600)
        tab = self.h.tab()
        tab.script = CALL_ROWS
        script = os.path.join(self.h.dir, "responses.cjs")
        with open(script, "w", encoding="utf-8") as f:
            f.write(NODE_SCRIPT)
        env = dict(os.environ, NODE_PATH=os.path.join(HERE, "node_modules"))
        r = subprocess.run([shutil.which("node") or "node", script, self.h.url + "/v1"], capture_output=True,
                           text=True, timeout=60, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["plain"], [["message", None, None], ["function_call", "get_weather", '{"city":"Paris"}']])
        self.assertEqual(out["text"], "Checking. ")
        self.assertEqual([n for _, n in out["events"]], list(range(len(out["events"]))))
        self.assertEqual(out["events"][-1][0], "response.completed")
        self.assertIn("response.function_call_arguments.done", [t for t, _ in out["events"]])
