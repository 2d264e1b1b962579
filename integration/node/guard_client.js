'use strict'
// An offline-mode Minecraft client (npm minecraft-protocol) that connects FROM a chosen
// loopback address, for discoproxy's guard tests (integration/test_guard_peers.py):
//   node guard_client.js <port> <handshake host> <username> <version> <local address> [hold s]
// Like mc_client.js it connects to 127.0.0.1:<port> and announces <handshake host>
// (fakeHost), but its socket is bound to <local address> (127.0.0.2, 127.0.0.3, … are all
// on lo on Linux), through createClient's documented `connect` option, so an upstream
// HAProxy carries that address in its PROXY header. With [hold s] > 0 it stays in the
// play state that long (answering keep-alives) before it ends, so a test can hold a
// connection open. Prints JSON lines on stdout and exits:
//   {"event":"connect","address":"127.0.0.2","port":51234}   TCP connected, from there
//   {"event":"play","state":"play"}                          reached the play state
//   {"event":"disconnect","reason":"…"}                      kicked during login or play
//   {"event":"error","message":"…"}
//   {"event":"end","reason":"…"}                             the connection ended
// It gives up after TIMEOUT_MS (plus the hold) so a stalled proxy cannot hang the tests.
const net = require('net')
const mc = require('minecraft-protocol')

const TIMEOUT_MS = 10000
const [port, fakeHost, username, version, localAddress, hold = '0'] = process.argv.slice(2)
const HOLD_MS = Number(hold) * 1000
const emit = (event, fields) => console.log(JSON.stringify({ event, ...fields }))
const text = (reason) => (typeof reason === 'string' ? reason : JSON.stringify(reason))

const client = mc.createClient({
  host: '127.0.0.1',
  port: Number(port),
  username,
  auth: 'offline',
  fakeHost,
  version,
  hideErrors: true,
  // The client's 'connect' (which sends the handshake) follows the socket's own.
  connect: (client) => {
    client.setSocket(net.connect({ host: '127.0.0.1', port: Number(port), localAddress }))
  }
})

client.on('connect', () =>
  emit('connect', { address: client.socket.localAddress, port: client.socket.localPort })
)
client.on('login', () => {
  emit('play', { state: client.state })
  if (HOLD_MS > 0) {
    setTimeout(() => client.end('test done'), HOLD_MS)
  } else {
    client.end('test done')
  }
})
client.on('disconnect', (packet) => emit('disconnect', { reason: text(packet.reason) }))
client.on('kick_disconnect', (packet) => emit('disconnect', { reason: text(packet.reason) }))
client.on('error', (error) => emit('error', { message: String(error) }))
client.on('end', (reason) => {
  emit('end', { reason: text(reason) })
  process.exit(0)
})
setTimeout(() => {
  emit('timeout', { state: client.state })
  process.exit(2)
}, TIMEOUT_MS + HOLD_MS).unref()
