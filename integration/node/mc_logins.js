'use strict'
// Offline-mode Minecraft logins (npm minecraft-protocol), one after another from one
// process, for tests that log in dozens of real clients:
// `node mc_logins.js <port> <handshake host> <version> <username>...`. Each username is a
// client of its own, as mc_client.js makes it (its own connection to 127.0.0.1:<port>,
// announcing <handshake host>, ended once in play); only node's start and loading
// minecraft-protocol (most of a login's CPU) are shared. Prints JSON lines on stdout, each
// naming its client, and exits once the last login is over:
//   {"event":"connect","username":"p0","port":51234}   TCP connected, from 127.0.0.1:<port>
//   {"event":"play","username":"p0","ms":312}          reached the play state, ms after
//                                                      this client started
//   {"event":"disconnect","username":"p0","reason":"…"} kicked during login or play
//   {"event":"end","username":"p0","reason":"…"}       the connection ended
// A login that is not over after TIMEOUT_MS prints {"event":"timeout",…} and the next starts.
const mc = require('minecraft-protocol')

const [port, fakeHost, version, ...usernames] = process.argv.slice(2)
const TIMEOUT_MS = 10000
const emit = (event, username, fields) => console.log(JSON.stringify({ event, username, ...fields }))
const text = (reason) => (typeof reason === 'string' ? reason : JSON.stringify(reason))

function login (username) {
  return new Promise((resolve) => {
    const started = Date.now()
    const client = mc.createClient({
      host: '127.0.0.1',
      port: Number(port),
      username,
      auth: 'offline',
      fakeHost,
      version,
      hideErrors: true
    })
    const timer = setTimeout(() => {
      emit('timeout', username, { state: client.state })
      client.removeAllListeners()
      client.on('error', () => {})
      client.end('timeout')
      resolve()
    }, TIMEOUT_MS)
    client.on('connect', () => emit('connect', username, { port: client.socket.localPort }))
    client.on('login', () => {
      emit('play', username, { state: client.state, ms: Date.now() - started })
      client.end('test done')
    })
    client.on('disconnect', (packet) => emit('disconnect', username, { reason: text(packet.reason) }))
    client.on('kick_disconnect', (packet) => emit('disconnect', username, { reason: text(packet.reason) }))
    client.on('error', (error) => emit('error', username, { message: String(error) }))
    client.on('end', (reason) => {
      clearTimeout(timer)
      emit('end', username, { reason: text(reason) })
      resolve()
    })
  })
}

;(async () => {
  for (const username of usernames) await login(username)
  process.exit(0)
})()
