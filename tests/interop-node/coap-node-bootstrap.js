// coap-node (npm, a LwM2M client nobody here wrote) bootstrapping from the
// gateway's bootstrap server, then registering where it was sent. Used by
// tests/interop.rs. One JSON line per event on stdout.
//   node coap-node-bootstrap.js <bootstrap-host> <bootstrap-port> <endpoint>
'use strict';
const CoapNode = require('coap-node');
const SmartObject = require('smartobject');

const [host, port, endpoint] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const so = new SmartObject();
let t = 20.5;
so.init(3303, 0, {
  5700: { read: (cb) => cb(null, t) },
  5701: 'Cel',
});
setInterval(() => { t = Math.round((t + 0.5) * 10) / 10; }, 500);

const node = new CoapNode(endpoint, so, { lifetime: 300 });
node.on('bootstrapped', () => {
  const sec = so.dumpSync('lwm2mSecurity');
  const srv = so.dumpSync('lwm2mServer');
  say({ event: 'bootstrapped', security: sec, server: srv });
});
node.on('registered', () => say({ event: 'registered' }));
node.on('error', (e) => say({ event: 'error', message: String(e) }));
node.bootstrap(host, Number(port), (err, rsp) => {
  if (err) {
    say({ event: 'bootstrap_failed', message: String(err) });
    process.exit(1);
  }
  say({ event: 'bootstrap_response', status: rsp && rsp.status });
});
process.on('SIGTERM', () => process.exit(0));
