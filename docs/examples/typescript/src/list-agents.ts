// An operator lists the fleet with the NATS services client ($SRV.PING/INFO),
// as `nats micro ls` does, from the context `signalbox identity nats-context` writes.
//
//   signalbox identity nats-context signalbox
//   node dist/list-agents.js ~/.config/nats/context/signalbox.json
import { readFileSync } from "node:fs";
import { connect, RequestStrategy } from "nats";

interface Context {
  url: string;
  user: string;
  password: string;
  token: string;
  inbox_prefix: string;
}

async function main(): Promise<void> {
  const path = process.argv[2];
  if (!path) throw new Error("usage: node dist/list-agents.js CONTEXT.json");
  const context = JSON.parse(readFileSync(path, "utf8")) as Context;
  const nc = await connect({
    servers: context.url,
    ...(context.token ? { token: context.token } : { user: context.user, pass: context.password }),
    // Operators may subscribe only under their inbox prefix: without it, no answers.
    inboxPrefix: context.inbox_prefix,
  });
  try {
    const client = nc.services.client({ strategy: RequestStrategy.JitterTimer, maxWait: 2000 });
    for await (const info of await client.info()) {
      console.log(`${info.name}\t${info.version}\t${info.id}`);
    }
  } finally {
    await nc.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
