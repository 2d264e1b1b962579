'use strict'
// An offline-mode Minecraft client (npm minecraft-protocol) for discoproxy's integration
// tests: `node mc_client.js <port> <handshake host> <username> <version> [hold]`. It connects to
// 127.0.0.1:<port> but announces <handshake host> (fakeHost), as a player would through a
// DNS name pointing at the proxy. Prints JSON lines on stdout and exits:
//   {"event":"connect","port":51234}      TCP connected, from 127.0.0.1:<port>
//   {"event":"play"}                      reached the play state (login packet received)
//   {"event":"disconnect","reason":"…"}   kicked during login or play
//   {"event":"end","reason":"…"}          the connection ended
// It gives up after TIMEOUT_MS so a stalled proxy cannot hang the test run. With `hold` it
// stays in play (answering keep-alives) until the server ends it, for up to HOLD_MS.
const mc = require('minecraft-protocol')

const [port, fakeHost, username, version, mode] = process.argv.slice(2)
const hold = mode === 'hold'
const TIMEOUT_MS = hold ? 60000 : 10000
const emit = (event, fields) => console.log(JSON.stringify({ event, ...fields }))
const text = (reason) => (typeof reason === 'string' ? reason : JSON.stringify(reason))

const client = mc.createClient({
  host: '127.0.0.1',
  port: Number(port),
  username,
  auth: 'offline',
  fakeHost,
  version,
  hideErrors: true
})

client.on('connect', () => emit('connect', { port: client.socket.localPort }))
client.on('login', () => {
  emit('play', { state: client.state })
  if (!hold) client.end('test done')
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
}, TIMEOUT_MS).unref()
