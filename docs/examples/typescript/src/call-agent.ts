// An agent outside the Python SDK: register, then call another agent through
// Signalbox, with the official NATS JavaScript client.
//
//   CREDENTIAL=$(signalbox agents enroll loan-origination --team lending --owner lending)
//   NATS_URL=nats://127.0.0.1:4222 CREDENTIAL=... node dist/call-agent.js
//
// Wire types: ../../../schemas/json/ (JSON Schema, one file per `type`).
import { connect, headers, JSONCodec } from "nats";

const me = "loan-origination"; // the agent the credential was enrolled for
const json = JSONCodec();

async function main(): Promise<void> {
  const nc = await connect({
    servers: process.env.NATS_URL ?? "nats://127.0.0.1:4222",
    token: process.env.CREDENTIAL,
    // Replies come only into the agent's own inbox; the default _INBOX.<random> is refused.
    inboxPrefix: `_INBOX.agent.${me}`,
  });
  try {
    const manifest = {
      type: "agent_manifest.v1", name: me, version: "3.0.1", owner: "lending", team: "lending",
    };
    const registered = await nc.request(`sb.registry.register.${me}`, json.encode(manifest), {
      timeout: 5000,
    });
    if (registered.headers?.get("Sb-Error")) {
      throw new Error(`registration refused: ${registered.string()}`);
    }
    const h = headers();
    h.set("Sb-Timeout-Ms", "5000");
    const reply = await nc.request(
      `sb.out.${me}.credit-check.score`,
      json.encode({ applicant_id: "a-17", income: 85_000 }),
      { timeout: 6000, headers: h },
    );
    const code = reply.headers?.get("Sb-Error");
    if (code) {
      const error = json.decode(reply.data) as { code: string; message: string };
      console.error(`${error.code}: ${error.message}`);
      process.exitCode = 1;
      return;
    }
    console.log(JSON.stringify(json.decode(reply.data)));
  } finally {
    await nc.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
