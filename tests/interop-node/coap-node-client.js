// A LwM2M client we did not write: coap-node (npm, PeterEB) with smartobject
// objects. Used by tests/interop.rs. Prints one JSON line per event on
// stdout: {"event":"registered"}, {"event":"exec","path":"/3/0/4"}, ...
//   node coap-node-client.js <gateway-host> <gateway-port> <endpoint>
'use strict';
const CoapNode = require('coap-node');
const SmartObject = require('smartobject');

const [host, port, endpoint] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const so = new SmartObject();
// A temperature sensor (IPSO 3303) whose value moves, to be observed.
let t = 21.5;
so.init(3303, 0, {
  5700: { read: (cb) => cb(null, t) },
  5701: 'Cel',
});
setInterval(() => { t = Math.round((t + 0.5) * 10) / 10; }, 500);

const node = new CoapNode(endpoint, so, { lifetime: 300 });
// coap-node installs its own Device object (3); ours replaces it, with the
// reboot and factory reset it lacks.
so.init(3, 0, {
  0: 'coap-node',
  1: 'interop-model',
  2: 'c-0001',
  3: '0.2.5',
  4: { exec: (cb) => { say({ event: 'exec', path: '/3/0/4' }); cb(null); } },
  5: { exec: (cb) => { say({ event: 'exec', path: '/3/0/5' }); cb(null); } },
});
node.on('registered', () => say({ event: 'registered' }));
node.on('error', (e) => say({ event: 'error', message: String(e) }));
node.register(host, Number(port), (err, rsp) => {
  if (err) {
    say({ event: 'register_failed', message: String(err) });
    process.exit(1);
  }
  say({ event: 'register_response', status: rsp && rsp.status });
});
process.on('SIGTERM', () => process.exit(0));
