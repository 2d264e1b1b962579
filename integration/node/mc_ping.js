'use strict'
// A server-list ping by npm minecraft-protocol's own mc.ping() for discoproxy's
// integration tests: `node mc_ping.js <port> <handshake host> <version>`. The socket goes
// to 127.0.0.1:<port> (the documented `stream` option, which mc.ping's connect honours)
// while the handshake announces <handshake host>, as a player's client does through a DNS
// name pointing at the proxy. Prints one JSON line on stdout and exits:
//   {"event":"status","port":51234,"description":…,"version":…,"players":…,"favicon":…,"latency":3}
//   {"event":"error","port":51234,"message":"…"}
// It gives up after TIMEOUT_MS so a stalled proxy cannot hang the test run.
const net = require('net')
const mc = require('minecraft-protocol')

const TIMEOUT_MS = 10000
const [port, host, version] = process.argv.slice(2)
const emit = (event, fields) => console.log(JSON.stringify({ event, ...fields }))

// The socket is handed over once connected: mc.ping emits its own 'connect' when given a
// stream, and a stream still connecting would emit a second one (a second handshake).
const stream = net.connect(Number(port), '127.0.0.1')
const failedToConnect = (error) => {
  emit('error', { port: null, message: String(error) })
  process.exit(1)
}
stream.once('error', failedToConnect)
stream.once('connect', () => {
  stream.removeListener('error', failedToConnect) // the client reports errors from here on
  const localPort = stream.localPort
  mc.ping({ host, port: Number(port), version, stream, closeTimeout: TIMEOUT_MS })
    .then((result) => {
      emit('status', {
        port: localPort,
        description: result.description,
        version: result.version,
        players: result.players,
        favicon: result.favicon ?? null,
        latency: result.latency ?? null
      })
      process.exit(0)
    })
    .catch((error) => {
      emit('error', { port: localPort, message: String(error) })
      process.exit(1)
    })
})
setTimeout(() => {
  emit('timeout', { port: stream.localPort ?? null })
  process.exit(2)
}, TIMEOUT_MS + 1000).unref()
